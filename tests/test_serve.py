"""megatrain serve: continuous batching equal to one-at-a-time decoding, and the OpenAI API through the real `openai`
client against a live server on 127.0.0.1 (completions, chat, streaming, logprobs, errors, a client that leaves).

The batcher's tests build a small random model in this process (fast tier); the server's train a tiny byte-level
model, start uvicorn in a thread on a free port, and talk HTTP to it (slow tier).
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from megatrain.generate import generate
from megatrain.model import Transformer
from megatrain.model_config import ModelConfig
from megatrain.serve.batcher import Batcher, Sampling, Sequence


def _model(**over) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=96), **over})
    model = Transformer(cfg)
    with torch.no_grad():  # logits far apart: greedy choices that rounding cannot flip
        model.lm_head.weight.mul_(30)
    return model.eval()


def _serve(batcher: Batcher, prompts: list[list[int]], sampling: list[Sampling]) -> list[Sequence]:
    done = threading.Semaphore(0)
    seqs = [Sequence(p, s, lambda t: t.finish and done.release(), time.monotonic() + 60, lambda ids: "")
            for p, s in zip(prompts, sampling)]
    batcher.submit(seqs)
    for _ in seqs:
        assert done.acquire(timeout=60)
    return seqs


@pytest.mark.parametrize("over", [{}, dict(sliding_window=8, global_attn_every=2, attn_softcap=20.0),
                                  dict(position="learned", norm="layernorm", mlp="gelu", bias=True)],
                         ids=["llama", "sliding-window-softcap", "gpt2"])
def test_continuous_batching_decodes_what_one_at_a_time_decoding_does(over):
    """Ten prompts of other lengths and budgets through 4 slots (requests join and leave mid-batch, the cache rows
    move): each one's greedy tokens equal generate()'s on it alone, and the forwards are shared."""
    model = _model(**over)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 60, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (10,), generator=g)]
    budgets = [int(n) for n in torch.randint(1, 40, (10,), generator=g)]
    batcher = Batcher(model, eod_id=63, vocab_limit=64, slots=4).start()
    try:
        seqs = _serve(batcher, prompts, [Sampling(max_tokens=n, temperature=0) for n in budgets])
    finally:
        batcher.stop()
    for p, n, seq in zip(prompts, budgets, seqs):
        alone = generate(model, torch.tensor([p]), n, temperature=0, eod_id=63)[0, len(p):].tolist()
        assert seq.out == alone
    assert batcher.steps < sum(len(s.out) for s in seqs) / 2  # most tokens came from a shared forward


def test_sampling_with_a_seed_repeats_and_top_p_keeps_the_nucleus():
    from megatrain.serve.batcher import sample

    model = _model()
    batcher = Batcher(model, eod_id=63, vocab_limit=64, slots=2).start()
    try:
        s = Sampling(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
        a, b = _serve(batcher, [[1, 2, 3], [1, 2, 3]], [s, s])
        c, = _serve(batcher, [[1, 2, 3]], [Sampling(max_tokens=20, temperature=1.0, top_p=0.9, seed=8)])
    finally:
        batcher.stop()
    assert a.out == b.out and a.out != c.out
    logits = torch.tensor([3.0, 2.0, 1.0, -5.0])  # probabilities .665 .245 .090 .000
    picks = {sample(logits, 1.0, 0.8, torch.Generator().manual_seed(i)) for i in range(200)}
    assert picks == {0, 1}  # 0.665 falls short of 0.8; 0.665 + 0.245 reaches it


# --- a live server (slow: trains a tiny model, starts uvicorn) ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from training_utils import make_byte_dataset, set_args, small_sets

    w = tmp_path_factory.mktemp("serve")
    ck = str(w / "ck")
    sets = small_sets(make_byte_dataset(w), ck, **{"train.max_steps": 20, "train.eval_interval": 0,
                                                   "checkpoint.interval": 0, "model.max_seq_len": 1024})
    r = subprocess.run([sys.executable, "-m", "megatrain.cli", "pretrain", "--config", "tiny", *set_args(sets)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return ck


class LiveServer:
    """`megatrain serve`'s own load and app, uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, ck: str, *flags: str):
        import uvicorn

        from megatrain.serve import add_arguments, load
        from megatrain.serve.api import build_app

        p = argparse.ArgumentParser()
        add_arguments(p)
        self.port = _free_port()
        self.served, _ = load(p.parse_args(["--checkpoint", ck, "--port", str(self.port), *flags]))
        self.served.batcher.start()
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.served), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health").json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.served.batcher.stop()


@pytest.fixture(scope="module")
def server(trained):
    s = LiveServer(trained, "--model-name", "tiny")
    yield s
    s.close()


def _greedy(ck_model, tok, text: str, n: int) -> str:
    ids = tok.encode(text)
    out = generate(ck_model, torch.tensor([ids]), n, temperature=0, eod_id=tok.eod_id, vocab_limit=tok.vocab_size)
    new = out[0, len(ids):].tolist()
    return tok.decode(new[: new.index(tok.eod_id)] if tok.eod_id in new else new)


@pytest.mark.slow
def test_completions_and_chat_through_the_openai_client(server):
    """Greedy text equal to generate()'s (and what `megatrain generate` prints), concurrent requests each equal to
    their own, chat through the chat format, streaming equal to the whole answer, usage counted."""
    served = server.served
    model, tok = served.batcher.model, served.tokenizer
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="the quick", max_tokens=24, temperature=0)
    assert r.choices[0].text == _greedy(model, tok, "the quick", 24)
    assert r.usage.prompt_tokens == len(tok.encode("the quick")) and r.usage.completion_tokens >= 1

    prompts = [f"{w} " * (i % 3 + 1) for i, w in enumerate("king queen castle horse sword river stone light".split())]
    results = [None] * len(prompts)

    def ask(i):
        results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=16 + i,
                                               temperature=0).choices[0].text
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [_greedy(model, tok, p, 16 + i) for i, p in enumerate(prompts)]

    msgs = [{"role": "user", "content": "a lazy dog"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0)
    assert whole.choices[0].message.content == _greedy(model, tok, "User: a lazy dog\nAssistant: ", 20)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    two = client.completions.create(model="tiny", prompt="the", max_tokens=12, temperature=1.0, n=2, seed=3)
    again = client.completions.create(model="tiny", prompt="the", max_tokens=12, temperature=1.0, n=2, seed=3)
    assert [c.text for c in two.choices] == [c.text for c in again.choices] and len(two.choices) == 2

    text = _greedy(model, tok, "the quick", 24)
    stop = text[5:7]
    cut = client.completions.create(model="tiny", prompt="the quick", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_completion_logprobs_are_the_models(server):
    served = server.served
    model, tok = served.batcher.model, served.tokenizer
    r = server.client().completions.create(model="tiny", prompt="the quick", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = tok.encode("the quick")
    new = [tok.encode(t)[0] for t in lp.tokens]  # (byte tokens: one byte each)
    with torch.no_grad():
        logits = model(torch.tensor([ids + new]))[0, len(ids) - 1: -1, : served.batcher.vocab_limit]
        logp = torch.log_softmax(logits.float(), -1)  # over the tokenizer's pieces: the padding rows are never chosen
    assert lp.token_logprobs == pytest.approx([float(logp[i, t]) for i, t in enumerate(new)], abs=1e-4)
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(float(logp[i].max()), abs=1e-4)
               for i, top in enumerate(lp.top_logprobs))


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    import httpx
    import openai

    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "tiny" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x" * 1100, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}], max_tokens=2)
    for body in ('{"model": "tiny", "prompt": ', '[1, 2]', '{"model": "tiny"}', '{"model": "tiny", "prompt": "x", '
                                                                              '"temperature": "hot"}'):
        r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    server.served.request_timeout = 0  # every request is past its deadline before it gets a slot
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert e.value.status_code == 504
    finally:
        server.served.request_timeout = 600
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0).choices[0].text is not None
    assert server.health()["status"] == "ok"


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    import httpx

    before = server.health()["steps"]
    body = {"model": "tiny", "prompt": "the", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(8)) if line.startswith("data:")]
    assert got and json.loads(got[0][5:])["choices"][0]["index"] == 0
    deadline = time.monotonic() + 20
    while server.health()["running"]:
        assert time.monotonic() < deadline, server.health()
        time.sleep(0.05)
    assert server.health()["steps"] - before < 900  # it stopped long before its 1000 tokens
    r = server.client().completions.create(model="tiny", prompt="the", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")


@pytest.mark.slow
def test_a_full_queue_answers_429(trained):
    import openai

    s = LiveServer(trained, "--model-name", "tiny", "--slots", "1", "--max-waiting", "1")
    try:
        client = s.client()
        long = client.completions.create(model="tiny", prompt="the", max_tokens=1000, temperature=0, stream=True)
        next(iter(long))  # it holds the one slot
        waiting = threading.Thread(target=lambda: client.completions.create(model="tiny", prompt="a", max_tokens=2))
        waiting.start()
        deadline = time.monotonic() + 20
        while s.health()["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="b", max_tokens=2)
        assert "--max-waiting 1" in e.value.body["message"]
        long.close()
        waiting.join(timeout=60)
    finally:
        s.close()


@pytest.mark.slow
def test_greedy_output_equals_transformers_on_the_export(trained, tmp_path):
    """The served model's greedy tokens equal transformers' generate on the to-hf export of the same checkpoint, and
    the export served as a Hugging Face folder answers the same."""
    from transformers import AutoModelForCausalLM

    hf_dir = str(tmp_path / "hf")
    r = subprocess.run([sys.executable, "-m", "megatrain.cli", "convert", "to-hf", trained, "--output", hf_dir],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    for path in (trained, hf_dir):
        s = LiveServer(path, "--model-name", "m")
        try:
            tok = s.served.tokenizer
            text = s.client().completions.create(model="m", prompt="over the", max_tokens=30, temperature=0)
            ids = torch.tensor([tok.encode("over the")])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False,
                              pad_token_id=tok.pad_id, eos_token_id=tok.eod_id)[0, ids.shape[1]:].tolist()
            assert text.choices[0].text == tok.decode([t for t in out if t != tok.eod_id])
        finally:
            s.close()


def test_a_port_in_use_is_one_line():
    from megatrain.config import ConfigError
    from megatrain.serve import check_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port}: cannot listen there"):
            check_port("127.0.0.1", port)
