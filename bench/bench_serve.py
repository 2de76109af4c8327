"""Serving benchmark: `megatrain serve` with continuous batching against the same server one request at a time, and
against transformers' `generate` in a loop, on the same chat requests (greedy, the same token budget).

    python bench/bench_serve.py [--model DIR] [--requests 16] [--max-tokens 32] [--clients 1,4,16]

The model is SmolLM2-135M-Instruct as a Hugging Face folder (`bash ../shared/data/fetch_smollm2.sh` writes it to
~/.cache/megatrain-real-data/smollm2-135m; any causal LM folder or megatrain checkpoint works). Each server is a
`megatrain serve` process of its own on 127.0.0.1 (--slots 16, and --slots 1: one request at a time, the rest queued;
both up, each level measured on one then the other); the clients are threads of this process streaming through the `openai` client, each taking the next request until
all are answered. Per request: time to first token (the first streamed text), time per output token after it; per
run: completion tokens / wall time. transformers' loop runs in this process before the servers start and after they
stop; the faster of the two counts.
Results go to bench/results/bench_serve.json.
"""
from __future__ import annotations

import argparse
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from results_file import write_results  # noqa: E402

TOPICS = ("the sea", "a lighthouse", "bread", "winter mornings", "a chess opening", "rivers", "the moon", "a library",
          "bees", "a violin", "mountains", "rain on a roof", "a train station", "gardens", "the alphabet", "clocks")


def requests(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`megatrain serve` in a process of its own, up once /health answers."""

    def __init__(self, model: str, slots: int):
        import httpx

        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "megatrain.cli", "serve", "--checkpoint", model, "--port",
                                      str(self.port), "--slots", str(slots), "--model-name", "m", "--max-waiting",
                                      "256"], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"megatrain serve exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("megatrain serve did not start in 300 s")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def drive(port: int, chats: list[list[dict]], clients: int, max_tokens: int) -> dict:
    """Every request through `clients` concurrent streaming clients: throughput and latency percentiles."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(chats)):
        todo.put(i)
    texts, ttft, tpot, tokens = [""] * len(chats), [], [], []

    def worker():
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            t0, first, n = time.perf_counter(), None, 0
            stream = client.chat.completions.create(model="m", messages=chats[i], max_tokens=max_tokens, temperature=0,
                                                    stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    texts[i] += chunk.choices[0].delta.content
                if chunk.usage:
                    n = chunk.usage.completion_tokens
            end = time.perf_counter()
            ttft.append((first or end) - t0)
            if n > 1:
                tpot.append((end - (first or end)) / (n - 1))
            tokens.append(n)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return dict(clients=clients, requests=len(chats), completion_tokens=sum(tokens), wall_s=wall,
                tokens_per_s=sum(tokens) / wall, ttft_p50_s=pct(ttft, 50), ttft_p99_s=pct(ttft, 99),
                tpot_p50_s=pct(tpot, 50), tpot_p99_s=pct(tpot, 99), texts=texts)


def pct(xs: list[float], q: int) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else float("nan")


def hf_loop(model_dir: str, chats: list[list[dict]], max_tokens: int) -> dict:
    """transformers' generate, one request after another, greedy, the same prompts (the chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    texts, n = [], 0
    start = time.perf_counter()
    with torch.inference_mode():
        for chat in chats:
            ids = torch.tensor([tok.encode(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                                           add_special_tokens=False)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
            n += len(out)
            texts.append(tok.decode(out, skip_special_tokens=True))
    wall = time.perf_counter() - start
    return dict(requests=len(chats), completion_tokens=n, wall_s=wall, tokens_per_s=n / wall, texts=texts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.path.expanduser("~/.cache/megatrain-real-data/smollm2-135m"))
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_serve.json"))
    args = p.parse_args()
    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model}: not there; `bash ../shared/data/fetch_smollm2.sh` writes SmolLM2")
    chats = requests(args.requests)
    levels = [int(c) for c in args.clients.split(",")]
    hf_runs = [hf_loop(args.model, chats, args.max_tokens)]  # once before the servers start, once after they stop
    runs = []
    servers = {}
    try:  # both servers up at once (an idle one waits without using the CPU): each level is measured on both in
        # turn, so a change in the machine's other load falls on both sides alike
        for slots, mode in ((16, "batched"), (1, "one at a time")):
            servers[mode] = Server(args.model, slots)
            drive(servers[mode].port, chats[:2], 1, 4)  # warm-up: the first forwards allocate
        for c in levels:
            for mode, server in servers.items():
                r = drive(server.port, chats, c, args.max_tokens)
                runs.append(dict(mode=mode, slots=16 if mode == "batched" else 1, **r))
                print(f"{mode:>14} {c:>3} clients: {r['tokens_per_s']:7.1f} tokens/s, time to first token p50 "
                      f"{r['ttft_p50_s']:.3f} s p99 {r['ttft_p99_s']:.3f} s, per output token p50 "
                      f"{1e3 * r['tpot_p50_s']:.1f} ms p99 {1e3 * r['tpot_p99_s']:.1f} ms", flush=True)
    finally:
        for server in servers.values():
            server.close()
    hf_runs.append(hf_loop(args.model, chats, args.max_tokens))
    hf = max(hf_runs, key=lambda r: r["tokens_per_s"])  # the run the machine's other load disturbed least
    both = ", ".join(f"{r['tokens_per_s']:.1f}" for r in hf_runs)
    print(f"transformers generate loop: {hf['tokens_per_s']:.1f} tokens/s (the faster of {both})", flush=True)
    one = [r for r in runs if r["mode"] == "batched" and r["clients"] == 1][0]
    same_hf = sum(a == b for a, b in zip(one["texts"], hf["texts"]))
    same_batched = min(sum(a == b for a, b in zip(one["texts"], r["texts"])) for r in runs)
    for r in runs:
        r.pop("texts")
    hf.pop("texts")
    top = max(levels)
    best = [r for r in runs if r["mode"] == "batched" and r["clients"] == top][0]
    serial = [r for r in runs if r["mode"] == "one at a time" and r["clients"] == top][0]
    print(f"at {top} clients: {best['tokens_per_s'] / serial['tokens_per_s']:.2f}x one-at-a-time, "
          f"{best['tokens_per_s'] / hf['tokens_per_s']:.2f}x transformers' loop; outputs equal to transformers' "
          f"{same_hf}/{len(chats)}, across every run {same_batched}/{len(chats)}")
    write_results(args.out, dict(model=os.path.basename(os.path.normpath(args.model)), max_tokens=args.max_tokens,
                                 runs=runs, hf_loop=hf, hf_loop_tokens_per_s=[r["tokens_per_s"] for r in hf_runs],
                                 same_as_transformers=same_hf, same_across_runs=same_batched))


if __name__ == "__main__":
    main()
