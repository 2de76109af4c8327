"""Continuous batching: many requests share each forward pass of one model.

A request joins the running batch as soon as a slot is free and leaves it at the token that ends it, so a short
answer never waits for a long one. One thread owns the model and loops:

    1. drop what is finished elsewhere: cancelled (client gone) or past its deadline, waiting or running;
    2. admit waiting requests into free slots and prefill their prompts in one forward (rows padded on the right);
       each samples its first token at once;
    3. one decode step for every running request: its last token in, its next token out.

The KV cache has one row (slot) per running request, each at its own position (SlotCache); a finished request's
slot is filled by moving the last running one into it, so the running requests are always slots 0..n-1 and every
forward reads the cache through views, without gathering rows.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Callable

import torch

from megatrain.model import KVCache, Transformer
from megatrain.model_config import head_dim, kv_heads


class SlotCache(KVCache):
    """Keys and values of `slots` sequences, [slots, kv heads, length, head_dim] a layer, the length grown (doubled)
    as the longest sequence needs, up to max_len; `select` names the rows a forward works on (a range of slots) and
    each row's positions. A sliding-window layer keeps every position: its window is part of the mask (`visible`)."""

    def __init__(self, cfg, slots: int, max_len: int, device, dtype):
        self.shape = (slots, kv_heads(cfg), 0, head_dim(cfg))
        self.k = [torch.zeros(self.shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(self.shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.max_len = max_len

    def select(self, first: int, positions: torch.Tensor) -> None:
        """The next forward's rows are slots first.. first+B-1, row b's tokens at positions[b] ([B, T])."""
        self.rows = slice(first, first + positions.shape[0])
        self.positions = positions
        self.length = int(positions.max()) + 1  # keys past every row's last position are never read
        if self.length > self.k[0].shape[2]:
            self._grow(min(self.max_len, max(self.length, 2 * self.k[0].shape[2], 64)))
        keys = torch.arange(self.length, device=positions.device)
        self.offsets = positions[:, :, None] - keys  # [B, T, length]: query position minus key position

    def _grow(self, length: int) -> None:
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                cache[i] = torch.zeros(self.shape[:2] + (length,) + self.shape[3:], device=old.device, dtype=old.dtype)
                cache[i][:, :, : old.shape[2]] = old

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        B = k.shape[0]
        rows = torch.arange(B, device=k.device)[:, None]
        self.k[layer][self.rows][rows, :, self.positions] = k.transpose(1, 2)  # [B, T, kv, hd] at (row, position)
        self.v[layer][self.rows][rows, :, self.positions] = v.transpose(1, 2)
        return self.k[layer][self.rows, :, : self.length], self.v[layer][self.rows, :, : self.length]

    def visible(self, window: int) -> torch.Tensor:
        """[B, 1, T, length] bool: a query sees the keys at its position and before (within `window` if set)."""
        seen = self.offsets >= 0
        if window:
            seen &= self.offsets < window
        return seen[:, None]

    def move(self, src: int, dst: int, length: int) -> None:
        """Slot src's first `length` positions into slot dst (the batch stays slots 0..n-1)."""
        for cache in (*self.k, *self.v):
            cache[dst, :, :length] = cache[src, :, :length]


@dataclasses.dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # texts that end the output (not included in it)
    logprobs: int | None = None  # the chosen token's log-probability and this many of the likeliest (completions)


@dataclasses.dataclass
class Token:
    """What a running sequence sends its client, token by token: `text` (its new characters: held back while they
    may be the start of a stop text or of a character not finished), and at the end `finish` (stop, length)."""
    text: str
    token: int | None = None
    logprob: float | None = None
    top: dict[str, float] | None = None
    finish: str | None = None


class Sequence:
    """One choice of one request: its prompt, sampling settings, and what it generated so far. `send` is called on
    the batcher's thread with each Token; `cancel()` (any thread) ends it at the next step."""

    def __init__(self, prompt: list[int], sampling: Sampling, send: Callable[[Token], None], deadline: float,
                 decode: Callable[[list[int]], str]):
        self.prompt, self.sampling, self.send, self.deadline, self.decode = prompt, sampling, send, deadline, decode
        self.out: list[int] = []
        self.sent = 0  # characters of the decoded output sent so far
        self.cancelled = False
        self.generator = None
        if sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling.seed)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def length(self) -> int:  # tokens in the cache once the last sampled one is fed
        return len(self.prompt) + len(self.out)


class Busy(Exception):
    """The waiting queue is full."""


class Batcher:
    """The model, a SlotCache of `slots` rows and the thread that serves `submit`ted sequences."""

    def __init__(self, model: Transformer, eod_id: int, vocab_limit: int, slots: int = 16, max_waiting: int = 64,
                 max_len: int | None = None, prefill_tokens: int = 4096):
        self.model = model.eval()
        self.cfg = model.cfg
        self.eod_id, self.vocab_limit = eod_id, vocab_limit
        self.slots, self.max_waiting, self.prefill_tokens = slots, max_waiting, prefill_tokens
        self.max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        param = next(model.parameters())
        self.device = param.device
        self.cache = SlotCache(self.cfg, slots, self.max_len, param.device, param.dtype)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # running[i] lives in slot i
        self.wake = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="megatrain-batcher", daemon=True)
        self.steps = 0  # forwards run (prefills and decode steps), for /health and the tests
        self.error: BaseException | None = None

    def start(self) -> "Batcher":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify()
        self.thread.join(timeout=30)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences together (all or none: Busy when the queue has no room for them)."""
        with self.wake:
            if len(self.waiting) + len(seqs) > self.max_waiting:
                raise Busy(f"{len(self.waiting)} requests are waiting, the most this server queues "
                           f"(--max-waiting {self.max_waiting}); retry later")
            self.waiting.extend(seqs)
            self.wake.notify()

    def load(self) -> dict:
        return dict(running=len(self.running), waiting=len(self.waiting), slots=self.slots, steps=self.steps)

    # --- the batcher's thread ---

    def _loop(self) -> None:
        try:
            while True:
                with self.wake:
                    while not self.stopped and not self.waiting and not self.running:
                        self.wake.wait()
                    if self.stopped:
                        return
                    self._drop_ended()
                    admitted = self._admit()
                with torch.inference_mode():
                    if admitted:
                        self._prefill(admitted)
                    if self.running:
                        self._decode()
        except BaseException as e:  # noqa: BLE001 - told to every client, and /health reports it
            self.error = e
            for seq in [*self.running, *self.waiting]:
                seq.send(Token("", finish="error"))
            raise

    def _drop_ended(self) -> None:
        now = time.monotonic()
        for seq in [s for s in self.waiting if s.cancelled or now > s.deadline]:
            self.waiting.remove(seq)
            seq.send(Token("", finish="cancelled" if seq.cancelled else "timeout"))
        for seq in [s for s in self.running if s.cancelled or now > s.deadline]:
            self._finish(seq, "cancelled" if seq.cancelled else "timeout")

    def _admit(self) -> list[Sequence]:
        admitted, budget = [], self.prefill_tokens
        while self.waiting and len(self.running) + len(admitted) < self.slots:
            if admitted and len(self.waiting[0].prompt) > budget:
                break  # the rest waits for the next step: decoding the running ones goes on meanwhile
            seq = self.waiting.popleft()
            budget -= len(seq.prompt)
            admitted.append(seq)
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> None:
        """The new sequences' prompts in one forward, into slots n.. n+len(seqs)-1, padded on the right (a padded
        position's key is written past the prompt and overwritten by the token decoded there before anyone reads
        it)."""
        first = len(self.running)
        T = max(len(s.prompt) for s in seqs)
        tokens = torch.full((len(seqs), T), self.eod_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            tokens[b, : len(s.prompt)] = torch.tensor(s.prompt)
        positions = torch.arange(T).expand(len(seqs), T)
        self.running.extend(seqs)
        last = torch.tensor([len(s.prompt) - 1 for s in seqs], device=self.device)
        logits = self._forward(tokens, first, positions, rows=last)
        self._sample(seqs, logits)

    def _decode(self) -> None:
        seqs = list(self.running)
        tokens = torch.tensor([[s.out[-1]] for s in seqs])
        positions = torch.tensor([[s.length - 1] for s in seqs])
        logits = self._forward(tokens, 0, positions)
        self._sample(seqs, logits)

    def _forward(self, tokens: torch.Tensor, first: int, positions: torch.Tensor,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        """The next-token logits [B, V] of rows first.. (at `rows` positions of each, or the last)."""
        self.cache.select(first, positions.to(self.device))
        logits = self.model.next_logits(tokens.to(self.device), self.cache, 0, rows).float()
        self.steps += 1
        if self.vocab_limit < logits.shape[-1]:  # padding rows of the embedding are never chosen
            logits[:, self.vocab_limit:] = float("-inf")
        return logits

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        greedy = logits.argmax(-1).tolist()
        for b, seq in enumerate(seqs):
            s = seq.sampling
            token = greedy[b] if s.temperature <= 0 else sample(logits[b], s.temperature, s.top_p, seq.generator)
            seq.out.append(token)
            info = {}
            if s.logprobs is not None:
                logp = torch.log_softmax(logits[b], -1)
                info["logprob"] = float(logp[token])
                top = torch.topk(logp, s.logprobs) if s.logprobs else None
                info["top"] = {seq.decode([int(i)]): float(v) for v, i in zip(*top)} if top else {}
            self._advance(seq, token, info)

    def _advance(self, seq: Sequence, token: int, info: dict) -> None:
        """Send what the new token adds; end the sequence at the end-of-document token, a stop text or its limit."""
        ended = token == self.eod_id
        text = seq.decode(seq.out[:-1] if ended else seq.out)
        finish = "stop" if ended else None
        for stop in seq.sampling.stop:
            at = text.find(stop, max(0, seq.sent - len(stop)))
            if at >= 0:
                text, finish = text[:at], "stop"
        if finish is None and (len(seq.out) >= seq.sampling.max_tokens or seq.length >= self.max_len):
            finish = "length"
        if finish is None:  # hold back a character still being spelt, and what may begin a stop text
            safe = len(text.rstrip("\ufffd"))
            for stop in seq.sampling.stop:
                for n in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:n]):
                        safe -= n
                        break
            text = text[:max(safe, seq.sent)]
        delta, seq.sent = text[seq.sent:], max(seq.sent, len(text))
        seq.send(Token(delta, token, info.get("logprob"), info.get("top"), finish))
        if finish is not None:
            self._finish(seq, None)

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        """Free the sequence's slot (the last running one moves into it); `reason`: tell the client why."""
        i = self.running.index(seq)
        last = self.running.pop()
        if last is not seq:
            self.cache.move(len(self.running), i, last.length)
            self.running[i] = last
        if reason is not None:
            seq.send(Token("", finish=reason))


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """One token from logits [V] at `temperature`, from the smallest set of likeliest tokens whose probability
    reaches top_p (nucleus sampling)."""
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        p, order = probs.sort(descending=True)
        keep = p.cumsum(-1) - p < top_p  # a token stays while the ones before it fall short of top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))

