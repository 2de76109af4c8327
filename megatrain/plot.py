"""`megatrain plot RUN_DIR [RUN_DIR ...] [--output curves.png] [--metric loss,val_loss,lr,tokens_per_s]`: training
curves from metrics.jsonl as one image, PNG or the format the output's extension names (.pdf, .svg, ...; matplotlib,
Agg: no display needed).

One panel per metric, step on x, every run in its own colour and labelled by its folder. The training loss (and a
dpo run's training reward figures) is drawn raw (thin) and smoothed (an exponential moving average, thick);
evaluation metrics (val_*, train.eval_sets's val_loss/NAME, train.eval_tasks's lm_eval/TASK/METRIC: accuracies and
exact matches by default) as marked points; a resumed run continues on the same curve (a later row for a step
replaces an earlier one, as after a resume from an older checkpoint), with a dotted line where it stopped and
resumed. A fine-tuning run's default panels add its task metric (finetune.metric_for_best, or the task's own).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from megatrain.config import ConfigError

# the panels drawn by default (those the runs have): a MoE run adds its expert load (the worst layer's coefficient
# of variation of the tokens per expert, and its busiest expert's tokens over the mean) and its load-balancing loss;
# a dpo run its training batches' reward accuracy, margin and mean rewards
DPO_TRAIN = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
DEFAULT = ("loss", "val_loss", "lr", "tokens_per_s", "moe_load_cv", "moe_load_max", "moe_aux") + DPO_TRAIN
SMOOTHED = ("loss",) + DPO_TRAIN  # per-batch figures: drawn raw and smoothed
SMOOTHING_POINTS = 10  # the smoothed training loss averages over about a tenth of the points (window ~ n / 10)


def read_runs(run_dir: str) -> dict:
    """{"train": {step: row}, "eval": {step: row}, "stops": [step, ...], "task_metric": name or None}."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir}: no metrics.jsonl; point at a run's checkpoint.dir")
    out = {"train": {}, "eval": {}, "stops": [], "task_metric": None}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ConfigError(f"{path}:{n}: not a JSON line") from None
            kind = row.get("kind", "train")
            if kind in ("train", "eval"):
                # a resumed run re-logs the steps after its checkpoint: the later value wins; an evaluation's rows of
                # one step (validation, and lm-eval's scores arriving later from the background) add up
                out[kind][row["step"]] = {**out[kind].get(row["step"], {}), **row} if kind == "eval" else row
            elif kind in ("stop", "resume") and row["step"] not in out["stops"]:
                out["stops"].append(row["step"])
    state = _saved_config(run_dir)
    if state and state.get("finetune", {}).get("task"):
        defaults = {"classify": "val_accuracy", "tokens": "val_f1", "qa": "val_f1", "sft": "val_loss",
                    "dpo": "val_reward_accuracy"}
        out["task_metric"] = state["finetune"].get("metric_for_best") or defaults[state["finetune"]["task"]]
    return out


def _saved_config(run_dir: str) -> dict | None:
    from megatrain.checkpoint.io import read_pointer

    tag = read_pointer(run_dir, "latest")
    path = os.path.join(run_dir, tag or "", "megatrain.json")
    if tag and os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("config")
    return None


def is_eval_metric(metric: str) -> bool:
    """Logged by evaluations (drawn as points): validation losses and metrics, per-set losses, lm-eval scores."""
    return metric.startswith(("val_", "lm_eval/"))


def points(run: dict, metric: str) -> tuple[list[int], list[float]]:
    rows = run["eval"] if is_eval_metric(metric) else run["train"]
    steps = sorted(s for s, r in rows.items() if isinstance(r.get(metric), (int, float))
                   and math.isfinite(r[metric]))
    return steps, [float(rows[s][metric]) for s in steps]


def smooth(values: list[float]) -> list[float]:
    """An exponential moving average over about a tenth of the points, starting at the first value."""
    weight = min(0.95, max(0.0, 1 - SMOOTHING_POINTS / max(1, len(values))))
    out, avg = [], None
    for v in values:
        avg = v if avg is None else weight * avg + (1 - weight) * v
        out.append(avg)
    return out


def image_format(output: str) -> str:
    """The format `output`'s extension names, one matplotlib writes (but pgf: it needs LaTeX)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(set(FigureCanvasBase.get_supported_filetypes()) - {"pgf"})
    ext = os.path.splitext(output)[1].lower().lstrip(".")
    if ext not in formats:
        said = f".{ext} is not an image format" if ext else "no extension names the image format"
        raise ConfigError(f"--output {output}: {said}; end the name with one of .{', .'.join(formats)}")
    return ext


def plot(run_dirs: list[str], metrics: list[str] | None = None, output: str = "curves.png") -> dict:
    """Draw the runs' curves into `output` (the format its extension names); returns what was drawn:
    {metric: {run: {"steps", "values"[, "smoothed"]}}}."""
    from megatrain.checkpoint.io import checkpoint_inputs
    from megatrain.fileio import atomic_path, check_output_path

    check_output_path(output, "--output", example="curves.png",
                      inputs=[i for d in run_dirs for i in [("the run's metrics", os.path.join(d, "metrics.jsonl")),
                                                            *checkpoint_inputs(d)]])
    fmt = image_format(output)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {d.rstrip("/"): read_runs(d) for d in run_dirs}
    known = sorted({k for r in runs.values() for rows in (r["train"], r["eval"]) for row in rows.values()
                    for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "kind")})
    if metrics is None:
        metrics = list(DEFAULT) + sorted({r["task_metric"] for r in runs.values()
                                          if r["task_metric"] and r["task_metric"] not in DEFAULT})
        # train.eval_sets's losses and train.eval_tasks's scores (their accuracies, not every lm-eval metric)
        metrics += [k for k in known if k.startswith("val_loss/") or (k.startswith("lm_eval/") and
                                                                       k.rsplit("/", 1)[1] in ("acc", "exact_match"))]
        metrics = [m for m in metrics if m in known]
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise ConfigError(f"--metric {unknown[0]!r}: not in these runs' metrics.jsonl; known: {', '.join(known)}")
    if not metrics:
        raise ConfigError(f"{', '.join(runs)}: no metric rows to plot yet")
    cols = min(2, len(metrics))
    rows_n = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.4 * cols, 3.8 * rows_n), squeeze=False)
    drawn: dict = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics):
        drawn[metric] = {}
        for i, (name, run) in enumerate(runs.items()):
            steps, values = points(run, metric)
            if not steps:
                continue
            c, label = colors[i % len(colors)], os.path.basename(name) or name
            entry = {"steps": steps, "values": values}
            if is_eval_metric(metric):
                ax.plot(steps, values, "o-", color=c, label=label, markersize=4)
            elif metric in SMOOTHED:
                entry["smoothed"] = smooth(values)
                ax.plot(steps, values, color=c, alpha=0.3, linewidth=0.8)
                ax.plot(steps, entry["smoothed"], color=c, linewidth=2, label=f"{label} (smoothed)")
            else:
                ax.plot(steps, values, color=c, label=label)
            for s in run["stops"]:
                ax.axvline(s, color=c, linestyle=":", linewidth=1)
            drawn[metric][name] = entry
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if metric == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    if any(run["stops"] for run in runs.values()):
        fig.text(0.01, 0.01, "dotted: where a run stopped or resumed", fontsize=8)
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=110, format=fmt)
    plt.close(fig)
    return drawn


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="checkpoint.dir of a run (its metrics.jsonl)")
    p.add_argument("--output", default="curves.png",
                   help="the image to write, in the format its extension names: .png, .pdf, .svg, ... (default "
                        "curves.png)")
    p.add_argument("--metric", default=None,
                   help=f"comma-separated metrics (default: {','.join(DEFAULT)}, and a fine-tuning run's task metric)")


def command(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metric.split(",") if m.strip()] if args.metric else None
    drawn = plot(args.runs, metrics, args.output)
    print(f"{args.output}: {', '.join(drawn)} of {len(args.runs)} run{'s' if len(args.runs) > 1 else ''}",
          file=sys.stderr)
    return 0
