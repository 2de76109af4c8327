"""Language-model objectives: causal and masked pretraining, and supervised fine-tuning (sft) on conversations.

    causal   next-token prediction on packed pretraining samples (every position is a target)
    mlm      BERT-style masked LM: a seeded 15% of the positions, the mask a function of (seed, sample id)
    sft      {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} jsonl; the loss only on what the
             assistant says (and its end-of-turn token), several examples packed per sequence

The chat format: a Hugging Face tokenizer's own chat template when it has one; otherwise megatrain's plain one,

    System: {content}\\n                (if there is a system message)
    User: {content}\\n
    Assistant: {content}<eod>          the loss covers {content}<eod>; turns repeat

With finetune.generation_metrics, an sft evaluation also generates a response for each row of the file (greedy, up
to the end-of-document token, which is the end of the turn) and scores it against the row's last assistant turn
(tasks/metrics.py generation_metrics); `megatrain predict` generates through the same `SFT.respond`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from megatrain.data.readers import InputError
from megatrain.data.task_files import field_of, read_records
from megatrain.model import IGNORE_INDEX, generate
from megatrain.tasks.base import Batch, Examples, FinetuneTask, Task, in_file_order
from megatrain.tasks.metrics import generation_metrics, generation_score_names


class CausalLM(Task):
    """Next-token prediction on packed samples; with `eod` (data.document_attention) each token attends only within
    its document, which ends with (and holds) the end-of-document token."""

    name = "causal"
    constant_targets = True

    def __init__(self, eod: int | None = None):
        self.eod = eod

    def make(self, dataset, ids: np.ndarray, device) -> Batch:
        tokens = torch.from_numpy(np.stack([dataset[int(i)] for i in ids]))
        inputs = tokens[:, :-1]
        segments = None
        if self.eod is not None:  # 1, 2, ...: a new document starts after each end-of-document token
            ends = (inputs == self.eod).long()
            segments = (1 + ends.cumsum(1) - ends).to(device)
        return Batch(inputs.to(device), tokens[:, 1:].contiguous().to(device), segments)

    def targets(self, batch: Batch) -> int:
        return batch.labels.numel()


def mlm_mask(tokens: torch.Tensor, mask_id: int, vocab_size: int, prob: float, generator: torch.Generator,
             special_ids: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `prob` of the positions; of those 80% -> mask_id, 10% -> random id, 10% kept.
    Returns (inputs, labels) with labels = -100 where nothing is predicted."""
    inputs, labels = tokens.clone(), tokens.clone()
    chosen = torch.rand(tokens.shape, generator=generator) < prob
    for s in special_ids:
        chosen &= tokens != s
    labels[~chosen] = IGNORE_INDEX
    r = torch.rand(tokens.shape, generator=generator)
    inputs[chosen & (r < 0.8)] = mask_id
    random_pos = chosen & (r >= 0.8) & (r < 0.9)
    inputs[random_pos] = torch.randint(0, vocab_size, tokens.shape, generator=generator)[random_pos]
    return inputs, labels


@dataclass
class MaskedLM(Task):
    """BERT masking of pretraining samples; the mask of a sample depends only on (seed, sample id), like the sample."""

    seed: int
    mask_id: int
    vocab_size: int
    probability: float = 0.15
    special_ids: tuple = ()
    name = "mlm"

    def make(self, dataset, ids: np.ndarray, device) -> Batch:
        inputs, labels = [], []
        for i in ids:
            row = torch.from_numpy(dataset[int(i)])[:-1]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
            x, y = mlm_mask(row, self.mask_id, self.vocab_size, self.probability, g, self.special_ids)
            inputs.append(x)
            labels.append(y)
        return Batch(torch.stack(inputs).to(device), torch.stack(labels).to(device))


ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def has_chat_template(tok) -> bool:
    """Whether the tokenizer is a Hugging Face one with its own chat template (else megatrain's plain format)."""
    return bool(getattr(getattr(tok, "tok", None), "chat_template", None))


def _fields_needed(rec, *keys: str) -> None:
    """A row that lacks what an sft model reads (a classify row {text, label} given to one, say): one line naming
    the fields it reads and those the row has."""
    missing = [k for k in keys if k not in rec.fields]
    if missing:
        has = ", ".join(repr(k) for k in list(rec.fields)[:6]) or "none"
        raise InputError(f"{rec.where}: no {missing[0]!r} field (it has {has}); a finetune.task=sft model reads rows "
                         f"{{{', '.join(repr(k) for k in keys)}}} or {{'messages': [{{'role', 'content'}}, ...]}}")


class SFT(FinetuneTask):
    name = "sft"
    metric = "val_loss"
    metrics = ("val_loss", "val_ppl")

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.metrics = (*self.metrics, *(f"val_{k}" for k in generation_score_names(cfg.finetune.generation_metrics)))

    def conversation(self, rec) -> list[dict]:
        if "messages" in rec.fields:
            msgs = rec.fields["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs):
                raise InputError(f"{rec.where}: \"messages\" must be a list of {{\"role\": system|user|assistant, "
                                 f"\"content\": text}}")
            return msgs
        _fields_needed(rec, "prompt", "response")
        return [{"role": "user", "content": field_of(rec, "prompt", "prompt")},
                {"role": "assistant", "content": field_of(rec, "response", "response")}]

    def prompt_messages(self, rec) -> list[dict]:
        """What predict continues: the row's messages, or its prompt as the user's turn (a response is not needed)."""
        if "messages" in rec.fields:
            return self.conversation(rec)
        _fields_needed(rec, "prompt")
        return [{"role": "user", "content": field_of(rec, "prompt", "prompt")}]

    def render(self, msgs: list[dict]) -> list[tuple[str, list[tuple[int, int]]]]:
        """The conversation as text chunks, each with the character spans the loss covers; an end-of-document token
        follows each chunk of the plain format (the chat template writes its own end-of-turn tokens as text)."""
        if has_chat_template(self.tok):
            text, spans = "", []
            for i, m in enumerate(msgs):
                if m["role"] == "assistant":
                    prefix = self.tok.tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
                    full = self.tok.tok.apply_chat_template(msgs[: i + 1], tokenize=False)
                    spans.append((len(prefix), len(full)))
                    text = full
            return [(text or self.tok.tok.apply_chat_template(msgs, tokenize=False), spans)]
        chunks, text = [], ""
        for m in msgs:
            if m["role"] != "assistant":
                text += f"{ROLES[m['role']]}: {m['content']}\n"
                continue
            text += "Assistant: "
            chunks.append((text + m["content"], [(len(text), len(text) + len(m["content"]))]))
            text = ""
        return chunks

    def prompt_text(self, msgs: list[dict]) -> str:
        """The text the assistant's next turn follows (what predict feeds the model): the chat template's generation
        prompt, or the plain format up to `Assistant: `."""
        if has_chat_template(self.tok):
            return self.tok.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return "".join(f"{ROLES[m['role']]}: {m['content']}\n" for m in msgs) + "Assistant: "

    def prompt_ids(self, msgs: list[dict]) -> list[int]:
        """The tokens the assistant's next turn follows, as training renders the conversation: the chat template's
        generation prompt, or the plain format up to `Assistant: ` (where an earlier assistant turn ends with the
        end-of-document token, which prompt_text cannot hold)."""
        if has_chat_template(self.tok):
            return self.tok.encode(self.prompt_text(msgs))
        ids, _ = self.tokens([*msgs, {"role": "assistant", "content": ""}])
        return ids[:-1]  # (not the end-of-document token that closes the empty turn)

    def tokens(self, msgs: list[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and which of them the loss covers."""
        ids, target = [], []
        plain = not has_chat_template(self.tok)
        for text, spans in self.render(msgs):
            chunk, offsets = self.tok.encode_with_offsets(text)
            ids += chunk
            target += [any(a <= s < b for a, b in spans) for s, _ in offsets]
            if plain:  # the turn ends with the end-of-document token, which the model learns to say
                ids.append(self.tok.eod_id)
                target.append(True)
        return ids, target

    def encode(self, path: str, train: bool, labeled: bool = True) -> Examples:
        examples, truncated, prompts = [], 0, []
        for rec in read_records(path, self.cfg.finetune.format):
            msgs = self.conversation(rec)
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if last is not None:  # what generation_metrics continues, and the turn it expects
                prompts.append((msgs[:last], msgs[last]["content"]))
            ids, target = self.tokens(msgs)
            if len(ids) > self.max_len + 1:
                ids, target, truncated = ids[: self.max_len + 1], target[: self.max_len + 1], truncated + 1
            labels = [t if k else IGNORE_INDEX for t, k in zip(ids[1:], target[1:])]
            if any(y != IGNORE_INDEX for y in labels):
                examples.append((ids[:-1], labels))
        if not examples:
            raise InputError(f"{path}: no example has a response token left (all empty, or cut by max_seq_len)")
        order = np.random.default_rng(self.cfg.train.seed).permutation(len(examples)) if train else range(len(examples))
        rows = pack([examples[i] for i in order], self.max_len) if self.cfg.finetune.pack else \
            [dict(ids=x, labels=y, segments=[1] * len(x)) for x, y in examples]
        out = Examples(rows, self.cfg.train.seed, shuffle=train, truncated=truncated)
        out.prompts = prompts  # (messages before the last assistant turn, its content), in file order
        return out

    def collate(self, items: list, device) -> Batch:
        T = max(len(it["ids"]) for it in items)
        tokens = torch.full((len(items), T), self.pad, dtype=torch.long)
        labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
        segments = torch.zeros((len(items), T), dtype=torch.long)
        for b, it in enumerate(items):
            n = len(it["ids"])
            tokens[b, :n], labels[b, :n] = torch.tensor(it["ids"]), torch.tensor(it["labels"])
            segments[b, :n] = torch.tensor(it["segments"])
        return Batch(tokens.to(device), labels.to(device), segments.to(device))

    def score(self, examples: Examples, results: list) -> dict:
        return {}

    def evaluate(self, run, engine, examples: Examples, prefix: str = "val") -> dict:
        row = super().evaluate(run, engine, examples, prefix)
        row[f"{prefix}_ppl"] = float(math.exp(min(row[f"{prefix}_loss"], 50)))
        names = self.cfg.finetune.generation_metrics
        if names:
            scores = generation_metrics(self.responses(run, engine, examples), [r for _, r in examples.prompts], names)
            row.update({f"{prefix}_{k}": v for k, v in scores.items()})
        return row

    def respond(self, model, msgs: list[dict], max_new_tokens: int, temperature: float = 0.0) -> tuple[str, bool]:
        """The assistant's next turn after `msgs` (greedy unless temperature > 0), up to its end-of-turn token: at most
        max_new_tokens, fewer where the model's context ends first (then the flag is True). The prompt keeps its
        last model.max_seq_len - 1 tokens."""
        ctx, eod = self.cfg.model.max_seq_len, self.tok.eod_id
        ids = self.prompt_ids(msgs)[-(ctx - 1):]
        room = ctx - len(ids)
        prompt = torch.tensor([ids], device=next(model.parameters()).device)
        new = generate(model, prompt, min(max_new_tokens, room), temperature=temperature, top_k=0, eod_id=eod,
                       vocab_limit=self.cfg.model.true_vocab_size or self.tok.vocab_size)[0, len(ids):].tolist()
        return self.tok.decode(new[: new.index(eod)] if eod in new else new), max_new_tokens > room

    @torch.no_grad()
    def responses(self, run, engine, examples: Examples) -> list[str]:
        """A greedy response to every prompt of the file (examples.prompts), on every rank: each data-parallel rank
        generates every dp-th one alone, from whole weights, and the ranks exchange them."""
        model = whole_model(run, engine)
        dp, r, limit = run.layout.dp, run.dp_rank, self.cfg.finetune.generation_max_new_tokens
        mine = [(i, self.respond(model, examples.prompts[i][0], limit)[0])
                for i in range(r, len(examples.prompts), dp)]
        return in_file_order(run, mine)


def whole_model(run, engine) -> torch.nn.Module:
    """The model one rank generates with alone: the engine's module, whose every weight each rank holds (tensor,
    pipeline and expert parallelism are refused with generation metrics), or under ZeRO-3 a plain copy of the
    gathered weights (the module itself gathers them at every call, in step with every rank, which responses of
    different lengths would break)."""
    module = engine.module
    if not any(hasattr(p, "ds_id") for p in module.parameters()):  # DeepSpeed's mark of a ZeRO-3 partitioned weight
        return module
    import deepspeed

    from megatrain.heads import build_model

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    copy = build_model(run.cfg).to(engine.device, next(module.parameters()).dtype)  # the engine's precision
    copy.load_state_dict(state)
    return copy.eval()


def pack(examples: list[tuple[list[int], list[int]]], max_len: int) -> list[dict]:
    """Examples in order into rows of at most max_len tokens, each example whole in one row (segments 1, 2, ...)."""
    rows, cur = [], dict(ids=[], labels=[], segments=[])
    for x, y in examples:
        if cur["ids"] and len(cur["ids"]) + len(x) > max_len:
            rows.append(cur)
            cur = dict(ids=[], labels=[], segments=[])
        seg = (cur["segments"][-1] if cur["segments"] else 0) + 1
        cur["ids"] += x
        cur["labels"] += y
        cur["segments"] += [seg] * len(x)
    if cur["ids"]:
        rows.append(cur)
    return rows
