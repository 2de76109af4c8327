"""Tokenizers behind one interface, chosen by a spec string.

    byte                      built-in byte-level tokenizer (256 bytes + special tokens), no file
    PATH.model                a sentencepiece model (also `sentencepiece:PATH`)
    DIR                       a directory from `megatrain train-tokenizer` (holds tokenizer.model), or a
                              Hugging Face tokenizer directory that AutoTokenizer loads offline
    PATH/tokenizer.json       a Hugging Face `tokenizers` file (also `hf:PATH` for a file or directory)

Every tokenizer has `vocab_size`, `eod_id`, `bos_id`, `pad_id`, `mask_id` (for masked LM; may be
None), `encode(text) -> list[int]` (no special tokens added) and `decode(ids) -> str`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence


class TokenizerError(ValueError):
    """A tokenizer spec that names nothing loadable."""


class Tokenizer:
    """The interface; see the subclasses."""

    name: str = "tokenizer"
    vocab_size: int
    eod_id: int
    bos_id: int | None = None
    pad_id: int | None = None
    mask_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of `text` and, for each, the [start, end) characters of `text` it came from (fine-tuning maps
        words and answer spans through them)."""
        raise NotImplementedError

    @property
    def spec(self) -> str:
        """A spec string that rebuilds this tokenizer."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then <eod>=256, <pad>=257, <bos>=258, <mask>=259."""

    name = "byte"
    SPECIALS = ("<eod>", "<pad>", "<bos>", "<mask>")

    def __init__(self):
        self.eod_id, self.pad_id, self.bos_id, self.mask_id = 256, 257, 258, 259
        self.vocab_size = 256 + len(self.SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, text: str) -> bytes:
        """The ids as a bytes object: the fast path used by preprocessing (np.frombuffer, uint8)."""
        return text.encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in (int(x) for x in ids) if i < 256).decode("utf-8", errors="replace")

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, spans = [], []
        for c, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids += list(b)
            spans += [(c, c + 1)] * len(b)
        return ids, spans

    @property
    def spec(self) -> str:
        return "byte"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file; eod is the model's `</s>` (eos) piece."""

    name = "sentencepiece"

    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.model_file = str(Path(model_file).resolve())
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with C++ text
            raise TokenizerError(f"{model_file}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        self.vocab_size = self.sp.get_piece_size()
        eos = self.sp.eos_id()
        if eos < 0:
            raise TokenizerError(f"{model_file}: the sentencepiece model has no eos piece to use as end-of-document")
        self.eod_id = eos
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        mask = self.sp.piece_to_id("<mask>")
        self.mask_id = mask if mask != self.sp.unk_id() else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: parallelism comes from preprocess workers (sentencepiece would use every core).
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        pieces = self.sp.encode(text, return_type="proto").pieces  # begin/end: byte offsets into the UTF-8 text
        char_at = _char_index_of_bytes(text)
        return [p.id for p in pieces], [(char_at[p.begin], char_at[p.end]) for p in pieces]

    @property
    def spec(self) -> str:
        return self.model_file


# The files a Hugging Face folder's vocabulary comes from: tokenizer.json (a fast tokenizer), or a slow tokenizer's
# sentencepiece model, BPE vocab.json (+ merges.txt) or WordPiece vocab.txt, which AutoTokenizer converts
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                    "vocab.txt")


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer: a `tokenizer.json` file, or a directory AutoTokenizer loads."""

    name = "hf"
    _EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]", "<eod>")

    def __init__(self, path: str):
        if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in VOCABULARY_FILES):
            # a model folder without its tokenizer (an export or download of the weights alone): AutoTokenizer would
            # say only "Couldn't instantiate the backend tokenizer"
            raise TokenizerError(f"{path}: holds no tokenizer files (tokenizer.json, or tokenizer.model, vocab.json + "
                                 f"merges.txt, vocab.txt); copy the tokenizer files of the model it came from into it")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        self.path = str(Path(path).resolve())
        try:
            if os.path.isdir(path):
                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            else:
                tok = PreTrainedTokenizerFast(tokenizer_file=path)
        except Exception as e:
            raise TokenizerError(f"{path}: cannot load a Hugging Face tokenizer ({str(e).splitlines()[0]})") from None
        self.tok = tok
        self.vocab_size = len(tok)
        vocab = tok.get_vocab()
        eod = tok.eos_token_id
        if eod is None:
            eod = next((vocab[n] for n in self._EOD_NAMES if n in vocab), None)
        if eod is None:
            raise TokenizerError(
                f"{path}: the tokenizer has no end-of-document token (tried eos and {', '.join(self._EOD_NAMES)}); "
                f"add one as a special token"
            )
        self.eod_id = int(eod)
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id
        self.mask_id = tok.mask_token_id if tok.mask_token_id is not None else vocab.get("<mask>", vocab.get("[MASK]"))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    @property
    def spec(self) -> str:
        return f"hf:{self.path}"


def _char_index_of_bytes(text: str) -> list[int]:
    """For every byte offset 0..len(utf8) of `text`, the index of the character that starts at or after it."""
    out = []
    for c, ch in enumerate(text):
        out += [c] * len(ch.encode("utf-8"))
    return out + [len(text)]


def parse_spec(spec: str) -> tuple[str | None, str | None]:
    """(kind, path) of a spec: ('byte', None); ('sentencepiece' | 'hf', PATH) for a `kind:PATH` spec;
    (None, PATH) when the kind is read off what PATH holds."""
    spec = str(spec).strip()
    if spec == "byte":
        return "byte", None
    kind, _, rest = spec.partition(":")
    if kind in ("sentencepiece", "sp") and rest:
        return "sentencepiece", rest
    if kind == "hf" and rest:
        return "hf", rest
    return None, spec


def build_tokenizer(spec: str) -> Tokenizer:
    """Build a tokenizer from a spec string (see the module doc); unknown specs raise TokenizerError."""
    spec = str(spec).strip()
    kind, path = parse_spec(spec)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        return SentencePieceTokenizer(_existing(path, spec))
    if kind == "hf":
        return HFTokenizer(_existing(path, spec))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")) or os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            return HFTokenizer(path)
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
        raise TokenizerError(f"tokenizer spec {spec!r}: directory holds neither tokenizer.model nor tokenizer.json")
    if os.path.isfile(path):
        if path.endswith(".json"):
            return HFTokenizer(path)
        return SentencePieceTokenizer(path)
    raise TokenizerError(
        f"unknown tokenizer spec {spec!r}: use 'byte', a sentencepiece .model file, a tokenizer.json, "
        f"or a directory holding one (no such file or directory)"
    )


# Texts that tell vocabularies apart: two tokenizers of one size and end-of-document id that encode them alike are
# taken for one (a tokenizer and its Hugging Face export do; two sentencepiece models of one size trained on other
# text do not). Short (a tokenizer may warn above its model_max_length), and no special token's text in them (an
# export may read those as the special token).
PROBES = ("The quick brown fox jumps", " over the lazy dog,", " 1234567890 times;", " caf\u00e9 na\u00efve \u00fcber",
          " \u65e5\u672c\u8a9e!\n\tEnd.")


def vocabulary_difference(tok: Tokenizer, other: Tokenizer) -> str | None:
    """How `tok` differs from `other` as a vocabulary (their ids mean other text), in words; None where they agree:
    the same size, end-of-document id and ids for PROBES."""
    if tok.vocab_size != other.vocab_size:
        return f"{tok.vocab_size} pieces, not {other.vocab_size}"
    if tok.eod_id != other.eod_id:
        return f"end-of-document id {tok.eod_id}, not {other.eod_id}"
    if any(tok.encode(text) != other.encode(text) for text in PROBES):
        return f"{tok.vocab_size} pieces too, but other pieces (a sample text encodes to other ids)"
    return None


def check_same_vocabulary(tok: Tokenizer, flag: str, theirs: str, made: str, size: int | None = None) -> None:
    """`tok`, given as `flag` (e.g. "--tokenizer SPEC"), must be the vocabulary of `theirs`, the spec of the tokenizer
    that `made` says made the ids ("ck was trained with"). Where `theirs` no longer loads, only its size is compared
    (when known)."""
    try:
        other = build_tokenizer(theirs)
    except TokenizerError:
        other = None  # moved or deleted since: the caller's own checks of the size are what is left
    if other is not None:
        why = vocabulary_difference(tok, other)
    else:
        why = f"{tok.vocab_size} pieces, not {size}" if size and tok.vocab_size != size else None
    if why:
        raise TokenizerError(f"{flag}: another vocabulary than {theirs}, the tokenizer {made}: {why}; the same ids "
                             f"are other text in each: leave {flag.split()[0]} out to use {theirs}")


def _existing(path: str, spec: str) -> str:
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer spec {spec!r}: {path} does not exist")
    return path


# -- Hugging Face export: the same ids from `transformers.AutoTokenizer` -------------------------------------


def save_hf_tokenizer(tok: Tokenizer, out_dir: str, max_len: int | None = None) -> None:
    """Write `tok` as a Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) that encodes text to
    the same ids: the byte tokenizer as a byte-level BPE with no merges, a sentencepiece model as the equivalent
    `tokenizers` pipeline (BPE or unigram, byte fallback, the dummy prefix), a Hugging Face tokenizer as itself."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tok, HFTokenizer):
        tok.tok.save_pretrained(out_dir)
        return
    backend = _byte_level_tokenizer() if isinstance(tok, ByteTokenizer) else _sentencepiece_tokenizer(tok.model_file)
    names = {"eos_token": tok.eod_id, "bos_token": tok.bos_id, "pad_token": tok.pad_id, "mask_token": tok.mask_id}
    special = {k: backend.id_to_token(i) for k, i in names.items() if i is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   split_special_tokens=True,  # "<mask>" typed in text is text, as megatrain reads it
                                   model_max_length=max_len or int(1e30), **special)
    fast.save_pretrained(out_dir)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which byte-level BPE vocabularies are written in."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _byte_level_tokenizer():
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    chars = _bytes_to_unicode()
    backend = Backend(models.BPE({chars[b]: b for b in range(256)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in ByteTokenizer.SPECIALS])
    return backend


def _sentencepiece_tokenizer(model_file: str):
    """sentencepiece's own algorithm in `tokenizers`: pieces and scores (unigram) or pieces and the merges their
    order implies (BPE), byte fallback, the dummy prefix; control and unknown pieces as special tokens. Same ids as
    sentencepiece, except that a unigram model reads a control piece's literal text ("<mask>") as that piece."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if spec.model_type == spec.UNIGRAM:
        model = models.Unigram(pieces, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    elif spec.model_type == spec.BPE:
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        merges = sorted((i, vocab[p[:k]], vocab[p[k:]], p[:k], p[k:]) for i, (p, _) in enumerate(pieces)
                        if proto.pieces[i].type == proto.pieces[i].NORMAL
                        for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab)
        model = models.BPE(vocab, [(a, b) for *_, a, b in merges], unk_token=pieces[spec.unk_id][0], fuse_unk=True,
                           byte_fallback=spec.byte_fallback)
    else:
        raise TokenizerError(f"{model_file}: sentencepiece model type {spec.model_type} has no Hugging Face export "
                             f"(unigram and BPE do)")
    if norm.name not in ("identity", ""):
        raise TokenizerError(f"{model_file}: normalization rule {norm.name!r} has no exact Hugging Face equivalent; "
                             f"train with `megatrain train-tokenizer` (identity) to export it")
    backend = Backend(model)
    steps = ([normalizers.Prepend("▁")] if norm.add_dummy_prefix else []) + [normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []))
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces
                                if p.type in (p.UNKNOWN, p.CONTROL)])
    return backend
