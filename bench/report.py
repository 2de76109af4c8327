"""docs/benchmarks.md, generated from the results files in bench/results/.

    python bench/report.py            # writes docs/benchmarks.md
    python bench/report.py --check    # exit 1 when the committed page differs from what this would write

The page is never edited by hand. What each benchmark measures, how to run it and how to read it is the text in
bench/report_text.py (TEXT); every figure is read from a results file, next to the command, commit, date and machine
that file records (bench/results_file.py). A ratio is always printed with both of its sides. The output depends only
on the results files (fixed order, fixed number formats), so the check is stable. A results file this script has no
section for is an error: add one.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
PAGE = os.path.join(REPO, "docs", "benchmarks.md")

# the page's words: bench/report_text.py, beside this script (run as a script or loaded by its path)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report_text import HEADER, TEXT  # noqa: E402


# ---- formatting: fixed formats only, so the page is the same for the same files ----

def num(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def mil(n: float) -> str:
    """A parameter count in millions, at the precision of a run's rank table."""
    return f"{n / 1e6:.2f}M"


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def wrap(text: str, prefix: str = "") -> list[str]:
    """`text` in lines of at most 118 characters, never breaking inside a `code span`."""
    parts = text.split("`")
    glued = "`".join(p.replace(" ", "\0") if i % 2 else p for i, p in enumerate(parts))
    lines = textwrap.wrap(glued, 118, initial_indent=prefix, subsequent_indent=" " * len(prefix),
                          break_long_words=False, break_on_hyphens=False)
    return [line.replace("\0", " ") for line in lines]


def run_lines(meta: dict, name: str) -> list[str]:
    """The results file, its command, commit, date and machine."""
    commit = f"`{meta['commit']}`" + (" with uncommitted changes" if meta.get("dirty") else "")
    lines = [f"- Results: `bench/results/{name}`", f"- Command: `{meta['command']}`",
             f"- Commit: {commit}; date: {meta['date']}"]
    m = meta["machine"]
    if m.get("recorded") is False:
        lines.append(f"- Machine: not recorded ({m['note']})")
    else:
        lines.append(f"- Machine: {m['cpu'] or 'CPU model unknown'}, {m['cores']} cores, {m['memory_gib']} GiB "
                     f"memory; Python {m['python']}, torch {m['torch']}, DeepSpeed {m['deepspeed'] or 'not installed'}"
                     f"; {'GPU: ' + m['gpu'] if m['gpu'] else 'no GPU'}")
    if meta.get("backfilled"):
        lines.append(f"- {meta['backfilled'][0].upper()}{meta['backfilled'][1:]}")
    by_commit: dict[tuple, list[str]] = {}
    for row, v in (meta.get("rows_from_earlier_commits") or {}).items():
        by_commit.setdefault((v["commit"], v["date"]), []).append(f"`{row}`")
    for (commit, date), rows in by_commit.items():
        lines.append(f"- From an earlier run, stored by commit `{commit}` ({date}): {', '.join(rows)}")
    return [w for line in lines for w in wrap(line[2:], "- ")] + [""]


def section(key: str, subtitle: str, meta: dict, name: str, body: list[str]) -> dict:
    """One results file's part of the page's section `key` (a key of TEXT)."""
    body = [w for line in body for w in (wrap(line) if line and not line.startswith("|") else [line])]
    return dict(key=key, subtitle=subtitle, lines=run_lines(meta, name) + body)


# ---- one renderer per kind of results file: (file name, its JSON) -> its parts of the page's sections ----

def data(name: str, d: dict) -> list[dict]:
    r, p = d["reads"], d["preprocess"]
    ds, raw, bare = r["dataset_reads_per_s"], r["raw_memmap_reads_per_s"], r["bare_ndarray_reads_per_s"]
    body = table(["random sample reads/s", "megatrain", "baseline", "ratio"], [
        [f"seq_len {r['seq_len']}, {pct(r['share_spanning_documents'], 0)} of samples span 2+ documents", num(ds),
         f"`np.memmap` slicing: {num(raw)}", ratio(ds, raw)],
        ["the same", num(ds), f"bare ndarray slicing: {num(bare)}", ratio(ds, bare)]])
    rows = []
    for label, b in (("the synthetic corpus", d["index_build"]), ("document sizes alone", d["index_build_at_scale"])):
        rows.append([label, num(b["documents"]), num(b["tokens"]), num(b["samples"]) +
                     (f" ({b['epochs']} epochs)" if "epochs" in b else ""), f"{b['seconds']:.2f} s"])
    body += table(["sample-index build", "documents", "tokens", "samples", "time"], rows)
    rows = []
    for tok in ("sentencepiece", "byte"):
        w1, w2 = p[f"{tok}_w1"], p[f"{tok}_w2"]
        rows.append([tok, num(w1["tokens"]), num(w2["tokens_per_s"]), num(w1["tokens_per_s"]),
                     ratio(w2["tokens_per_s"], w1["tokens_per_s"])])
    body += table(["preprocess tokenizer", "tokens", "2 workers, tokens/s", "1 worker, tokens/s", "ratio"], rows)
    return [section("data", name, d["meta"], name, body)]


def kernels(name: str, d: dict) -> list[dict]:
    ops = d["ops"]
    shapes = any("shapes" in r for r in ops.values())
    gpu = any("bandwidth_fraction" in r for r in ops.values())
    head = ["op, forward + backward"] + (["inputs"] if shapes else []) + [
        "fused", "eager PyTorch", "speed", "fused peak", "eager peak", "fused / eager peak"]
    head += ["fused GB/s", "device peak GB/s", "fraction"] if gpu else []
    rows = []
    for op, r in ops.items():
        row = [f"`{op}`"] + ([", ".join("x".join(map(str, s)) for s in r.get("shapes", []))] if shapes else [])
        row += [f"{num(r['fused_ms'], 2)} ms", f"{num(r['eager_ms'], 2)} ms", ratio(r["eager_ms"], r["fused_ms"]),
                f"{num(r['fused_peak_mib'], 1)} MiB", f"{num(r['eager_peak_mib'], 1)} MiB",
                ratio(r["fused_peak_mib"], r["eager_peak_mib"]) if r["eager_peak_mib"] else "n/a"]
        if gpu:
            row += ([num(r["fused_gbs"], 0), num(r["device_peak_gbs"], 0), pct(r["bandwidth_fraction"], 0)]
                    if "bandwidth_fraction" in r else ["n/a", "n/a", "n/a"])
        rows.append(row)
    t = d["training_step"]
    body = [f"Device `{d['device']}`" + (f" ({d['gpu']})" if d.get("gpu") else "") +
            f", {d['dtype']}, fused implementation `{d['implementation']}`.", ""] + table(head, rows)
    body += table(["training step, 4x512 Llama-shaped", "fused kernels on", "off", "ratio"],
                  [["tokens/s", num(t["fused_tokens_per_s"]), num(t["eager_tokens_per_s"]),
                    ratio(t["fused_tokens_per_s"], t["eager_tokens_per_s"])]])
    return [section("kernels", f"Device `{d['device']}`", d["meta"], name, body)]


def train(name: str, d: dict) -> list[dict]:
    out = []
    if "vs_hf_llama" in d:
        out.append(train_llama(name, d["vs_hf_llama"], d["vs_hf_llama"].get("meta") or d["meta"]))
    if "baby_gpt" in d:
        part = d["baby_gpt"]
        meta = part.get("meta") or d["meta"]  # a part the last run skipped keeps the meta of the run that measured it
        out.append(train_baby(name, part, meta))
        if "step_profile" in part:
            out.append(profile_section(name, part["step_profile"], meta))
    return out


def train_llama(name: str, r: dict, meta: dict) -> dict:
    dims, mm = r["dims"], r["torch_mm_tflops"]
    body = [f"Model: {dims['layers']} layers, width {dims['width']}, {dims['heads']} heads, FFN {dims['ffn']}, "
            f"vocabulary {dims['vocab']}; sequence {dims['seq']}, micro-batch {dims['micro_batch']}; "
            f"{num(r['params_megatrain'])} parameters in megatrain's model, {num(r['params_hf'])} in HF's.", ""]
    body += table(["measure", "megatrain", "HF `LlamaForCausalLM`", "ratio"], [
        ["tokens/s", num(r["megatrain_tokens_per_s"]), num(r["hf_tokens_per_s"]),
         ratio(r["megatrain_tokens_per_s"], r["hf_tokens_per_s"])],
        ["model GFLOP/s", num(1e3 * r["megatrain_tflops"], 1), num(1e3 * r["hf_tflops"], 1),
         ratio(r["megatrain_tflops"], r["hf_tflops"])]])
    best, best_name = r["best_matmul_tflops"], r["best_matmul"]
    body += table(["side", "model GFLOP/s", f"best fp32 matmul GFLOP/s, same run (`{best_name}`)", "fraction",
                   "`torch.mm` GFLOP/s, same run"], [
        [who, num(1e3 * r[f"{key}_tflops"], 1), num(1e3 * best, 1), pct(r[f"{key}_tflops"] / best), num(1e3 * mm, 1)]
        for who, key in (("megatrain", "megatrain"), ("HF", "hf"))])
    split = r.get("step_time_split")
    if split:
        sides = [split["megatrain"], split["hf"]]
        rows = [[label] + [pct(s[key]) for s in sides]
                for label, key in (("matmuls", "matmul"), ("attention", "attention"), ("the rest", "rest"))]
        rows.append(["the rest's largest ops"] + [", ".join(f"`{k}` {pct(v)}" for k, v in s["top_rest"].items())
                                                  for s in sides])
        body += table(["share of a step's time (profiler, self time)", "megatrain", "HF"], rows)
    return section("train_llama", f"{name}, part 1", meta, name, body)


def val_losses(side: dict) -> dict:
    # files written before val_loss_by_eval_batches held one val_loss, evaluated over 20 batches on both sides
    return side.get("val_loss_by_eval_batches") or {"20": side["val_loss"]}


def train_baby(name: str, r: dict, meta: dict) -> dict:
    ref = r.get("nanogpt")
    ours_v, ref_v = val_losses(r), val_losses(ref) if ref else {}
    rows = []
    for n in sorted(set(ours_v) | set(ref_v), key=int):
        a, b = ours_v.get(n), ref_v.get(n)
        rows.append([f"validation loss, {n} batches", f"{a:.4f}" if a is not None else "not measured"]
                    + ([f"{b:.4f}" if b is not None else "not measured",
                        f"{a - b:+.4f}" if a is not None and b is not None else "n/a"] if ref else []))
    for label, key, digits, unit in (("ms/iteration", "ms_per_iteration", 2, ""), ("wall", "wall_seconds", 1, " s")):
        rows.append([label, num(r[key], digits) + unit]
                    + ([num(ref[key], digits) + unit, ratio(r[key], ref[key])] if ref else []))
    rows.append(["iterations", num(r["iterations"])] + ([num(ref["iterations"]), ""] if ref else []))
    head = ["measure", "megatrain"] + (["nanoGPT `train.py`", "megatrain − nanoGPT, or ratio"] if ref else [])
    overrides = ", ".join(f"`{o}`" for o in r.get("overrides", [])) or "none"
    body = [f"megatrain overrides: {overrides}. "
            + (f"nanoGPT: {ref['source']}." if ref else
               "No nanoGPT run in this results file (`--nanogpt DIR` was not given): no baseline, no ratio."), ""]
    return section("train_baby", f"{name}, part 2", meta, name, body + table(head, rows))


def profile_section(name: str, p: dict, meta: dict) -> dict:
    ours, ref = p["megatrain"], p["nanoGPT"]
    rows = [["vocabulary", str(ours["vocab"]), str(ref["vocab"]), ""]]
    for phase in ("forward", "backward", "optimizer", "step"):
        rows.append([f"{phase} (median)", num(ours["ms"][phase], 2), num(ref["ms"][phase], 2),
                     ratio(ours["ms"][phase], ref["ms"][phase])])
    for label, f in (("profiled step", lambda s: s["profiled_ms_per_step"]), ("in aten ops", lambda s: s["in_aten_ops_ms"]),
                     ("outside aten ops", lambda s: s["profiled_ms_per_step"] - s["in_aten_ops_ms"])):
        rows.append([label, num(f(ours), 2), num(f(ref), 2), ratio(f(ours), f(ref))])
    body = table(["per step, ms", "megatrain", "nanoGPT", "ratio"], rows)
    diffs = []
    for op in p["largest_op_differences_ms"]:
        a, b = ours["ops_ms"].get(op), ref["ops_ms"].get(op)
        diffs.append([f"`{op}`", num(a, 3) if a is not None else "not called", num(b, 3) if b is not None else "not called",
                      f"{(a or 0.0) - (b or 0.0):+.3f}"])
    body += table(["op (self time)", "megatrain ms", "nanoGPT ms", "difference"], diffs)
    return section("baby_profile", name, meta, name, body)


def baby_profile(name: str, d: dict) -> list[dict]:
    return [profile_section(name, d, d["meta"])]


def gpu_pretrain(name: str, d: dict) -> list[dict]:
    s = d["startup_s"]
    body = [f"`{d['config']}` ({mil(d['parameters'])} parameters), {d['precision']}, ZeRO-{d['zero_stage']}, one GPU, "
            f"sequence {d['seq']}, global batch {d['global_batch']} in micro-batches of {d['micro_batch']}; fused "
            f"kernels {'on' if d['fused_kernels'] else 'off'}, `model.compile` {'on' if d['compile'] else 'off'}. "
            f"{d['gpu_memory_after_build_gib']:.2f} GiB of GPU memory after the engine's build; MFU against "
            f"{d['peak_tflops']:.0f} TFLOP/s (dense bf16).", ""]
    body += table(["step", "loss", "tokens/s", "TFLOP/s", "MFU", "s/step"], [
        [str(r["step"]), f"{r['loss']:.4f}", num(r["tokens_per_s"]), num(r["tflops_per_device"], 1), pct(r["mfu"], 1),
         f"{r['seconds_per_step']:.3f}"] for r in d["log"]])
    body += [f"Start-up {s['total']:.1f} s (imports {s['imports']:.1f}, distributed {s['distributed']:.1f}, data "
             f"{s['data']:.1f}, model {s['model']:.1f}, engine {s['engine']:.1f}); the 20 steps and the final "
             f"checkpoint {d['train_s']:.1f} s.", ""]
    return [section("pretrain_gpu", "llama-1.3b on one GPU", d["meta"], name, body)]


def compile_(name: str, d: dict) -> list[dict]:
    where = f"{d.get('device', 'cpu')}, {d.get('precision', 'fp32')}, {d['threads']} threads"
    body = [f"Config `{d['config']}`, batch {d['batch'][0]} x {d['batch'][1]}, {where}, {d['iters']} iterations per "
            f"run.", ""]
    if "regional_ms" not in d:  # (the older file: eager against the whole model compiled)
        d = dict(d, whole_ms=d["compiled_ms"], regional_ms=None, first_step_s={"whole": d["first_compiled_step_s"]})
    eager = statistics.median(d["eager_ms"])
    rows = [[f"ms/iteration, median of {len(d['eager_ms'])} runs", num(eager, 2)],
            ["each run", ", ".join(num(x, 2) for x in d["eager_ms"])], ["ratio to eager", ""],
            ["first compiled step", ""]]
    head = ["", "eager"]
    for key, title in (("regional", "`model.compile` (each block)"), ("whole", "`torch.compile(model)`")):
        if d.get(f"{key}_ms"):
            head.append(title)
            med = statistics.median(d[f"{key}_ms"])
            for row, cell in zip(rows, (num(med, 2), ", ".join(num(x, 2) for x in d[f"{key}_ms"]),
                                        ratio(eager, med), f"{d['first_step_s'][key]:.1f} s")):
                row.append(cell)
    body += table(head, rows)
    return [section("compile", name, d["meta"], name, body)]


def finetune(name: str, d: dict) -> list[dict]:
    body = [f"`{d['config']}` shape, sequence {d['seq']}, global batch {d['global_batch']} in micro-batches of "
            f"{d['micro_batch']}, LoRA rank {d['lora_rank']}.", ""]
    if "repeats" in d:
        body[0] += (f" Each side ran {d['repeats']} times per row, alternating with the other, {d['steps']} timed "
                    f"steps a run: the median run, and the range over the runs in brackets.")

    def tps(r: dict, side: str) -> str:
        sp = r.get(f"{side}_spread")
        return num(r[f"{side}_tokens_per_s"]) + (f" [{num(sp['min'])}-{num(sp['max'])}]" if sp else "")

    rows = [[f"{r['task']}, {r['mode']}", tps(r, "megatrain"), tps(r, "hf"),
             ratio(r["megatrain_tokens_per_s"], r["hf_tokens_per_s"])
             + (f" [{r['ratio_spread']['min']:.2f}-{r['ratio_spread']['max']:.2f}]" if "ratio_spread" in r else ""),
             f"{num(r['megatrain_peak_rss_mib'])} MiB", f"{num(r['hf_peak_rss_mib'])} MiB",
             ratio(r["megatrain_peak_rss_mib"], r["hf_peak_rss_mib"]), "yes" if r["hf_with_deepspeed"] else "no"]
            for r in d["rows"]]
    body += table(["task, mode", "megatrain tokens/s", "Trainer tokens/s", "ratio", "megatrain peak RSS",
                   "Trainer peak RSS", "ratio", "Trainer with DeepSpeed"], rows)
    rows = []
    for task in dict.fromkeys(r["task"] for r in d["rows"]):
        full = next((r for r in d["rows"] if r["task"] == task and r["mode"] == "full"), None)
        for lora in (r for r in d["rows"] if r["task"] == task and r["mode"] != "full" and full):
            row = [f"{task}, {lora['mode']} / full"]
            for side in ("megatrain", "hf"):
                a, b = lora[f"{side}_peak_rss_mib"], full[f"{side}_peak_rss_mib"]
                row += [f"{num(a)} / {num(b)} MiB", ratio(a, b)]
            rows.append(row)
    body += table(["peak RSS", "megatrain", "ratio", "Trainer", "ratio"], rows)
    return [section("finetune", name, d["meta"], name, body)]


def convert(name: str, d: dict) -> list[dict]:
    body = [f"`{d['config']}` shape, vocabulary {d['vocab_size']}. Start-up alone (Python, torch and megatrain "
            f"imports), part of every wall time: {d['startup_s']:.1f} s.", ""]
    for r in d["rows"]:
        dd = f"{r['dd_gbps']:.3f} GB/s"
        rows = [["consolidate, wall", f"{r['consolidate_s']:.2f} s", f"DeepSpeed `zero_to_fp32`: "
                 f"{r['zero_to_fp32_s']:.2f} s", ratio(r["consolidate_s"], r["zero_to_fp32_s"])],
                ["consolidate, peak RSS", f"{num(r['consolidate_rss_mib'])} MiB", f"{num(r['zero_to_fp32_rss_mib'])} MiB",
                 ratio(r["consolidate_rss_mib"], r["zero_to_fp32_rss_mib"])]]
        for verb, key in (("consolidate", "consolidate"), ("to-hf", "to_hf"), ("from-hf", "from_hf")):
            for label, field in (("writing phase", f"{key}_data_gbps"), ("whole command", f"{key}_gbps")):
                if field in r:
                    v = r[field]
                    rows.append([f"{verb}, {label}", f"{v:.3f} GB/s" if v is not None else "not reported",
                                 f"`dd` with fdatasync: {dd}", ratio(v, r["dd_gbps"]) if v is not None else "n/a"])
        body += [f"2-rank ZeRO-{r['zero_stage']} checkpoint: {r['checkpoint_bytes'] / 1e9:.2f} GB on disk, "
                 f"{r['weights_bytes'] / 1e9:.2f} GB of fp32 weights.", ""]
        body += table(["measure", "megatrain", "baseline", "ratio"], rows)
    return [section("convert", name, d["meta"], name, body)]


def parallel(name: str, d: dict) -> list[dict]:
    meta = d["meta"]
    rows_ = {k: v for k, v in d.items() if k != "meta"}
    earlier = meta.get("rows_from_earlier_commits") or {}
    commit_of = {k: earlier.get(k, {}).get("commit", meta["commit"]) for k in rows_}
    ref_name = "dp2 ZeRO-1"
    ref = rows_.get(ref_name)
    psi = next(iter(rows_.values()))["psi"]
    rows = []
    for layout, r in rows_.items():
        states = max(r["bytes_per_rank"])
        theory, bucket = r["theory_bytes"], r.get("bucket_bytes", 0)
        if ref is None:
            vs = "n/a"
        elif commit_of[layout] != commit_of[ref_name]:
            vs = "n/a (another run)"
        else:
            vs = ratio(ref["step_s"], r["step_s"])
        rows.append([layout, f"{num(states / 2**20, 1)} MiB", f"{num(theory / 2**20, 1)} MiB", ratio(states, theory),
                     f"{num((theory + bucket) / 2**20, 1)} MiB" if bucket else "", ratio(states, theory + bucket) if bucket else "",
                     f"{r['step_s']:.2f} s", vs])
    body = [f"{psi / 1e6:.1f}M parameters (16Ψ = {num(16 * psi / 2**20)} MiB), 2 ranks.", ""]
    body += table(["layout", "model states / rank (the larger rank)", "theory", "ratio", "theory + ZeRO-3 bucket",
                   "ratio", "step time", f"vs {ref_name}"], rows)
    return [section("parallel", f"{psi / 1e6:.1f}M parameters", meta, name, body)]


def startup(name: str, d: dict) -> list[dict]:
    runs = {k: v for k, v in d.items() if k != "meta"}
    presets = list(dict.fromkeys(k.split(" | ")[0] for k in runs))
    body = []
    for preset in presets:
        rows = []
        for layout in dict.fromkeys(k.split(" | ")[1] for k in runs if k.startswith(preset + " |")):
            ways = {w: runs.get(f"{preset} | {layout} | {w}") for w in ("whole", "meta")}
            ok = {w: v for w, v in ways.items() if isinstance(v, list)}
            share = max(r["share_mib"] for v in ok.values() for r in v) if ok else None

            def cell(way, field, with_ratio=False):
                v = ways[way]
                if v is None:
                    return "not run"
                if not isinstance(v, list):
                    return f"did not start (exit {v['failed']}{', killed' if v.get('killed') else ''})"
                if not all(field in r for r in v):
                    return "no step taken"
                x = max(r[field] for r in v)
                return f"{num(x)} MiB" + (f" ({ratio(x, share)})" if with_ratio else "")

            rows.append([layout, f"{num(share)} MiB" if share else "n/a", cell("whole", "built_mib", True),
                         cell("meta", "built_mib", True),
                         f"{cell('whole', 'initialized_mib')} / {cell('meta', 'initialized_mib')}",
                         f"{cell('whole', 'stepped_mib')} / {cell('meta', 'stepped_mib')}"])
        body += table([f"{preset}, layout", "rank's share of the fp32 weights", "model built: whole",
                       "model built: meta", "after `deepspeed.initialize` (whole / meta)",
                       "after one step (whole / meta)"], rows)
    return [section("startup", ", ".join(presets), d["meta"], name, body)]


def soak(name: str, d: dict) -> list[dict]:
    after = [s for s in d["samples"] if s["step"] >= 1000]
    (s0, rss0), (s1, rss1) = d["rss_mib_at_step"], d["rss_mib_at_end"]
    mean_step = sum(s["step"] for s in after) / len(after)
    mean_rss = sum(s["rss_mib"] for s in after) / len(after)
    slope = (sum((s["step"] - mean_step) * (s["rss_mib"] - mean_rss) for s in after)
             / sum((s["step"] - mean_step) ** 2 for s in after))
    rows = [["steps", f"{num(d['steps'])} in {num(d['seconds'])} s" + ("" if d["complete"] else " (cut short)"), ""],
            ["resident memory", f"{rss0:.1f} MiB at step {num(s0)}", f"{rss1:.1f} MiB at step {num(s1)} "
             f"({rss1 / rss0 - 1:+.2%})"],
            ["resident memory, range after step 1,000", f"{min(s['rss_mib'] for s in after):.1f} MiB",
             f"{d['rss_max_mib']:.1f} MiB"],
            ["resident memory, trend after step 1,000", f"{1000 * slope:+.2f} MiB per 1,000 steps",
             f"{slope * (after[-1]['step'] - after[0]['step']) / rss0:+.1%} over the run"],
            ["open file descriptors after step 1,000", f"{d['fds_after_start'][0]} (fewest)",
             f"{d['fds_after_start'][1]} (most)"],
            ["checkpoint folder", f"{d['disk_mib_once_keep_last_reached']} MiB once {d['keep_last']} checkpoints "
             f"exist", f"{d['disk_mib_max_after']} MiB at most after"],
            ["checkpoints left", ", ".join(d["checkpoints_left"]), ""]]
    body = [f"A checkpoint every {num(d['interval'])} steps, `keep_last={d['keep_last']}`; "
            f"{len(d['samples'])} samples.", ""]
    return [section("soak", name, d["meta"], name, body + table(["measure", "first", "last"], rows))]


def moe(name: str, d: dict) -> list[dict]:
    out = []
    if "vs_dense" in d:
        r, z = d["vs_dense"], d["vs_dense"]["sizes"]
        dense, moe_ = r["dense"], r["moe"]
        body = [f"Width {z['d_model']}, {z['layers']} layers, {z['heads']} heads, sequence {z['seq_len']}, batch "
                f"{z['batch']}, {num(z['steps'])} steps, {z['experts']} experts top-{z['top_k']} of width "
                f"{z['moe_ffn']} against dense `d_ff` {z['dense_d_ff']}; byte vocabulary; learning rate {z['lr']}; validation "
                f"loss over {z['eval_batches']} batches at the end.", ""]
        body += table(["measure", "MoE", "dense", "ratio (MoE / dense)"], [
            ["parameters (active)", f"{mil(moe_['params'])} ({mil(moe_['active_params'])})", mil(dense["params"]), ""],
            ["tokens/s", num(moe_["tokens_per_s"]), num(dense["tokens_per_s"]),
             ratio(moe_["tokens_per_s"], dense["tokens_per_s"])],
            ["validation loss", f"{moe_['val_loss']:.4f}", f"{dense['val_loss']:.4f}",
             f"{moe_['val_loss'] - dense['val_loss']:+.4f} (difference)"],
            ["wall time", f"{moe_['wall_s']:.0f} s", f"{dense['wall_s']:.0f} s", ratio(moe_["wall_s"], dense["wall_s"])],
            ["load average before the run", f"{moe_['load_avg_before']:.2f}", f"{dense['load_avg_before']:.2f}", ""]])
        out.append(section("moe", "MoE against dense", r.get("meta") or d["meta"], name, body))
    if "grouped_mm" in d:
        r = d["grouped_mm"]
        rows = [[f"{c['d_model']} / {c['ffn']}", c["dtype"], f"{1e3 * c['grouped_s']:.1f} ms" +
                 ("" if c["grouped_mm"] else " (loop: no grouped matmul)"), f"{1e3 * c['loop_s']:.1f} ms",
                 ratio(c["loop_s"], c["grouped_s"]), f"{c['max_abs_diff']:.1e}"] for c in r["cases"]]
        body = [f"{num(r['rows'])} rows over {r['experts']} experts; median of {r['repeats']} repeats, best of 2 "
                f"interleaved rounds; {r['threads']} thread.", ""]
        body += table(["width / expert width", "dtype", "grouped matmul", "per-expert loop", "loop / grouped",
                       "largest difference"], rows)
        out.append(section("moe", "Grouped matmul against the loop", r.get("meta") or d["meta"], name, body))
    if "ep" in d:
        r, z = d["ep"], d["ep"]["sizes"]
        a, b = r["ep2"], r["ep1"]
        body = [f"Width {z['d_model']}, {z['layers']} layers, {z['experts']} experts top-{z['top_k']} of width "
                f"{z['moe_ffn']}, sequence {z['seq_len']}, micro-batch {z['micro_batch']}, global batch "
                f"{z['global_batch']}, {z['steps']} steps, {z['ranks']} ranks, ZeRO-{z['zero_stage']}; the larger "
                f"rank's figures.", ""]
        body += table(["measure", "EP=2", "EP=1", "ratio (EP=2 / EP=1)"], [
            ["parameters per rank", mil(max(a["params_per_rank"])), mil(max(b["params_per_rank"])),
             ratio(max(a["params_per_rank"]), max(b["params_per_rank"]))],
            ["RSS per rank at the start", f"{max(a['rss_gib_at_start']):.2f} GiB",
             f"{max(b['rss_gib_at_start']):.2f} GiB", ratio(max(a["rss_gib_at_start"]), max(b["rss_gib_at_start"]))],
            ["peak RSS over the run", f"{a['peak_rss_gib']:.2f} GiB", f"{b['peak_rss_gib']:.2f} GiB",
             ratio(a["peak_rss_gib"], b["peak_rss_gib"])],
            ["seconds per step", f"{a['seconds_per_step']:.3f} s", f"{b['seconds_per_step']:.3f} s",
             ratio(a["seconds_per_step"], b["seconds_per_step"])],
            ["load average before the run", f"{a['load_avg_before']:.2f}", f"{b['load_avg_before']:.2f}", ""]])
        out.append(section("moe", "Expert parallelism", r.get("meta") or d["meta"], name, body))
    return out


def long_(name: str, d: dict) -> list[dict]:
    out = []
    if "cp" in d:
        r, z = d["cp"], d["cp"]["sizes"]
        body = [f"Width {z['d_model']}, {z['layers']} layers of {z['heads']} heads, SwiGLU `d_ff` {z['d_ff']}, "
                f"{z['vocab']} vocabulary, micro-batch {z['batch']}, {z['steps']} steps, ZeRO-{z['zero_stage']}, "
                f"{z['precision']}; per rank, the largest rank's figures.", ""]
        rows = [[num(x["seq_len"]), str(x["cp"]), str(x["tp"]), str(x["ranks"]), mil(x["params_per_rank"]),
                 f"{x['rss_gib_at_start']:.2f} GiB", f"{x['peak_rss_gib']:.2f} GiB", f"{x['seconds_per_step']:.2f} s",
                 f"{x['load_avg_before']:.2f}"] for x in r["runs"]]
        body += table(["sequence", "cp", "tp", "ranks", "parameters per rank", "RSS at the start", "peak RSS",
                       "seconds per step", "load average before"], rows)
        by = {(x["seq_len"], x["cp"], x["tp"]): x for x in r["runs"]}
        body += table(["sequence", "peak RSS per rank, cp=2 / cp=1", "seconds per step, cp=2 / cp=1"], [
            [num(q["seq_len"]), f"{by[q['seq_len'], 2, 1]['peak_rss_gib']:.2f} / "
             f"{by[q['seq_len'], 1, 1]['peak_rss_gib']:.2f} GiB = {q['peak_rss_cp2_over_cp1']:.2f}x",
             f"{by[q['seq_len'], 2, 1]['seconds_per_step']:.2f} / {by[q['seq_len'], 1, 1]['seconds_per_step']:.2f} s "
             f"= {q['step_cp2_over_cp1']:.2f}x"] for q in r["ratios"]])
        out.append(section("long", "Context parallelism", r.get("meta") or d["meta"], name, body))
    if "documents" in d:
        r, z = d["documents"], d["documents"]["sizes"]
        a, b = r["documents"], r["dense"]
        body = [f"One block (width {z['d_model']}, {z['heads']} heads, SwiGLU `d_ff` {z['d_ff']}), "
                f"{num(z['seq_len'])} tokens in {z['documents']} equal documents, forward and backward, median of "
                f"{z['repeats']}, {z['threads']} thread, {z['precision']}; the outputs' sums differ by "
                f"{r['output_rel_diff']:.1e} (relative).", ""]
        body += table(["measure", "documents", "dense mask", "ratio (dense / documents)"], [
            ["seconds", f"{a['seconds']:.3f} s", f"{b['seconds']:.3f} s", ratio(b["seconds"], a["seconds"])],
            ["peak RSS growth", f"{a['peak_growth_gib']:.3f} GiB", f"{b['peak_growth_gib']:.3f} GiB",
             ratio(b["peak_growth_gib"], a["peak_growth_gib"])],
            ["load average before", f"{a['load_avg_before']:.2f}", f"{b['load_avg_before']:.2f}", ""]])
        out.append(section("long", "Document masking against the dense mask", r.get("meta") or d["meta"], name, body))
    return out


def ckpt(name: str, d: dict) -> list[dict]:
    span, threads, device = d["span_s"], d["threads"], d["device"]
    plural = "s" if threads != 1 else ""
    on = f"{threads} thread{plural}" if device == "cpu" else "a GPU"
    where = f"{threads} torch thread{plural} for training" if device == "cpu" else f"on one GPU ({device})"
    body = [f"`{d['config']}` shape, vocabulary {d['vocab_size']}, sequence {d['seq']}, micro-batch "
            f"{d['micro_batch']}, {d['precision']}, 1 rank, {where}: "
            f"{d['checkpoint_bytes'] / 1e9:.2f} GB a checkpoint, "
            f"{d['median_step_s']:.3f} s a step. {d['steps']} steps, a save every {d['every']} "
            f"({d['saves']} between the steps).", ""]
    body += table(["saves", f"{d['steps']} steps (the shorter of 2 runs)", "lost per save",
                   "inside a save call (median)"], [
        ["none", f"{span['none']:.2f} s", "", ""],
        ["synchronous", f"{span['sync']:.2f} s", f"{d['sync_s_per_save']:.2f} s", f"{d['sync_save_call_s']:.2f} s"],
        ["background (`checkpoint.async_save`)", f"{span['async']:.2f} s", f"{d['async_s_per_save']:.2f} s",
         f"{d['async_save_call_s']:.2f} s"]])
    body += table(["measure", "background", "synchronous", "ratio"], [
        ["training time lost per save", f"{d['async_s_per_save']:.2f} s", f"{d['sync_s_per_save']:.2f} s",
         ratio(d["async_s_per_save"], d["sync_s_per_save"])],
        ["inside a save call (median)", f"{d['async_save_call_s']:.2f} s", f"{d['sync_save_call_s']:.2f} s",
         ratio(d["async_save_call_s"], d["sync_save_call_s"])],
        [f"around each save ({d['around_window_steps']} steps before and after)"
         + ("" if d["around_covers_write"] else ", the write outlasting the window"),
         f"{d['async_s_per_save_around']:.2f} s", f"{d['sync_s_per_save_around']:.2f} s",
         ratio(d["async_s_per_save_around"], d["sync_s_per_save_around"])]])
    body += [f"A background write (in its thread, with fsync and the manifest's CRC-32) took "
             f"{d['async_background_write_s']:.2f} s (median).", ""]
    return [section("ckpt", f"Training on {on}", d["meta"], name, body)]


def serve(name: str, d: dict) -> list[dict]:
    runs, hf = d["runs"], d["hf_loop"]
    serial = {r["clients"]: r for r in runs if r["slots"] == 1}
    rows = []
    for r in runs:
        base = serial.get(r["clients"])
        rows.append([r["mode"] + (f" ({r['slots']} slots)" if r["slots"] > 1 else ""), str(r["clients"]),
                     num(r["tokens_per_s"], 1), ratio(r["tokens_per_s"], base["tokens_per_s"]) if base else "",
                     ratio(r["tokens_per_s"], hf["tokens_per_s"]), f"{r['ttft_p50_s']:.3f} s",
                     f"{r['ttft_p99_s']:.3f} s", f"{1e3 * r['tpot_p50_s']:.1f} ms", f"{1e3 * r['tpot_p99_s']:.1f} ms"])
    rows.append(["transformers `generate`, one after another", "1", num(hf["tokens_per_s"], 1), "", "1.00x", "", "",
                 "", ""])
    n = hf["requests"]
    body = [f"`{d['model']}`, {n} chat requests, greedy, at most {d['max_tokens']} tokens each. Outputs equal to "
            f"transformers' generate: {d['same_as_transformers']}/{n}; equal in every run of the server: "
            f"{d['same_across_runs']}/{n}.", ""]
    body += table(["server", "clients", "tokens/s", "vs one at a time", "vs transformers", "first token p50",
                   "p99", "per output token p50", "p99"], rows)
    return [section("serve", "Serving", d["meta"], name, body)]


def generate_(name: str, d: dict) -> list[dict]:
    rows = []
    for r in d["rows"]:
        ours, hf = r["megatrain"], r["transformers"]
        rows.append([str(r["batch"]), num(ours["tokens_per_s"], 1), num(hf["tokens_per_s"], 1),
                     ratio(ours["tokens_per_s"], hf["tokens_per_s"]), f"{1e3 * ours['ttft_s']:.0f} ms",
                     f"{1e3 * hf['ttft_s']:.0f} ms", f"{ours['ms_per_token']:.1f} ms", f"{hf['ms_per_token']:.1f} ms",
                     "yes" if r["tokens_equal"] else f"no ({r['token_agreement']:.1%} of positions)"])
    r0 = d["rows"][0]
    body = [f"`{d['model']}`, greedy, prompts of {r0['prompt_tokens']} tokens, {r0['new_tokens']} new tokens each, "
            f"fp32, {d['threads']} threads.", ""]
    body += table(["batch", "megatrain tokens/s", "transformers tokens/s", "ratio", "first token", "transformers",
                   "per step after it", "transformers", "same tokens"], rows)
    return [section("generate", "Generation", d["meta"], name, body)]


def first_step(name: str, d: dict) -> list[dict]:
    body = []
    if "warm" in d:
        w = d["warm"]
        split = ", ".join(f"{k} {v:.1f}" for k, v in w["startup_split"].items() if k != "total")
        body += table(["", "seconds"], [
            [f"`{w['command']}`, warm: command to the first logged step (median of {len(w['runs_s'])})",
             f"{w['seconds_to_first_step']:.2f}"],
            [f"its start-up line ({split})", f"{w['startup_split'].get('total', float('nan')):.1f}"]])
    if "fresh_home" in d:
        f = d["fresh_home"]
        body += table(["`baby-gpt`, whole run in a fresh HOME", "seconds", "vs the second"], [
            [f"first run ({f['steps']} steps)", f"{f['first_run_s']:.1f}", ratio(f["first_run_s"], f["second_run_s"])],
            ["second run", f"{f['second_run_s']:.1f}", "1.00x"]])
    return [section("first_step", "Time to the first step", d["meta"], name, body)]


# (file name pattern, patterns it must not match, renderer: (file name, its JSON) -> the parts of sections it fills)
RENDERERS = [
    ("bench_data.json", (), data),
    ("bench_kernels*.json", (), kernels),
    ("bench_train.json", (), train),
    ("gpu_pretrain.json", (), gpu_pretrain),
    ("baby_profile.json", (), baby_profile),
    ("bench_compile*.json", (), compile_),
    ("bench_finetune.json", (), finetune),
    ("bench_convert.json", (), convert),
    ("bench_ckpt*.json", (), ckpt),
    ("bench_parallel*.json", ("*_startup.json",), parallel),
    ("bench_parallel*_startup.json", (), startup),
    ("bench_moe.json", (), moe),
    ("bench_long.json", (), long_),
    ("soak.json", (), soak),
    ("bench_serve.json", (), serve),
    ("bench_generate.json", (), generate_),
    ("bench_startup.json", (), first_step),
]


def render(results: str = RESULTS) -> str:
    names = sorted(f for f in os.listdir(results) if f.endswith(".json"))
    parts, unknown = [], []
    for name in names:
        renderer = next((r for pattern, exclude, r in RENDERERS if fnmatch.fnmatch(name, pattern)
                         and not any(fnmatch.fnmatch(name, x) for x in exclude)), None)
        if renderer is None:
            unknown.append(name)
            continue
        with open(os.path.join(results, name)) as f:
            parts += renderer(name, json.load(f))
    if unknown:
        raise SystemExit(f"bench/report.py: no section for {', '.join(unknown)}: add a renderer to RENDERERS")
    lines = HEADER.splitlines() + [""]
    for key, t in TEXT.items():  # the page's order; within a section, the results files' names in order
        mine = [p for p in parts if p["key"] == key]
        if not mine:
            continue
        run = t["run"] + ("" if t["run"].endswith(".") else ".")
        lines += [f"## {t['title']}", ""] + wrap(t["measures"]) + [""] + wrap(f"Run: {run}") + [""] + wrap(t["read"])
        lines.append("")
        for p in mine:
            lines += ([f"### {p['subtitle']}", ""] if len(mine) > 1 else []) + p["lines"]
    while lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the committed page differs from the output")
    ap.add_argument("--results", default=RESULTS, help="the folder of results files")
    ap.add_argument("--out", default=PAGE, help="the page to write (or to check)")
    args = ap.parse_args()
    text = render(args.results)
    if args.check:
        current = open(args.out).read() if os.path.isfile(args.out) else None
        if current != text:
            print(f"{os.path.relpath(args.out, REPO)} is out of date: run `python bench/report.py`")
            return 1
        return 0
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
