"""Fine-tuning benchmark: megatrain against Hugging Face's Trainer (+ DeepSpeed ZeRO-1 when it runs here) on the same
model, data, batch, sequence length and precision: classify and sft, full and LoRA; and LoRA's peak memory against
full fine-tuning.

    python bench/bench_finetune.py [--config llama-125m] [--steps 6] [--seq 128] [--repeats 3]

One Llama-shaped model (the preset's shape, random weights, a 32000-row vocabulary) is written as a megatrain
checkpoint and exported with `convert to-hf`; the Trainer loads the export (LlamaForSequenceClassification /
LlamaForCausalLM, LoRA through peft on the same projections: q,k,v,o,gate,up,down where megatrain's fused qkv and
gate|up take one adapter each). The examples are the same token ids on both sides, all `--seq` tokens long (no
padding: tokens/s counts the same tokens), global batch 16 in micro-batches of 8, fp32, lr 1e-4. Every run is its own
process; a run's tokens/s is the median over its steps after 2 warm-up steps, its peak memory the process's peak RSS.
For each task and mode the two sides alternate `--repeats` times (megatrain, Trainer, megatrain, ...), so drift in
the machine's speed hits both alike; the table gives the median run of each side, their ratio, and the spread (min
and max over the runs). The last repeat of each side runs one step more, under torch.profiler (megatrain's
logging.profile_step; a Trainer callback on the other side), and the table prints where that step's time went:
matmuls, attention, and the rest with its biggest ops. Results go to bench/results/bench_finetune.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatrain.training.profiling import split_line  # noqa: E402
from results_file import write_results  # noqa: E402

G, MICRO, WARMUP = 16, 8, 2
HF_SCRIPT = r"""
import json, sys, time, torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainerCallback,
                          TrainingArguments)
from datasets import Dataset
task, hf_dir, data, steps, lora, out, use_ds, profile_step = sys.argv[1:9]
steps, lora, use_ds, profile_step = int(steps), int(lora), use_ds == "1", int(profile_step)
rows = [json.loads(l) for l in open(data)]
if task == "classify":
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=2, pad_token_id=0)
    ds = Dataset.from_list([{"input_ids": r["ids"], "labels": r["label"]} for r in rows])
else:
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    ds = Dataset.from_list([{"input_ids": r["ids"], "labels": r["labels"]} for r in rows])
if lora:
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=lora, lora_alpha=2 * lora, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="SEQ_CLS" if task == "classify" else "CAUSAL_LM"))
times = []
class Clock(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw): self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter() - self.t0)
class Profile(TrainerCallback):  # the step profile_step under torch.profiler, split as megatrain's logging.profile_step
    def on_step_begin(self, args, state, control, **kw):
        if state.global_step + 1 == profile_step:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == profile_step:
            from megatrain.training.profiling import op_split
            self.prof.__exit__(None, None, None)
            print("SPLIT", json.dumps(op_split(self.prof)))
ds_cfg = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True}
args = TrainingArguments(output_dir=out, per_device_train_batch_size=%d, gradient_accumulation_steps=%d,
                         max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=10**6,
                         save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                         deepspeed=ds_cfg if use_ds else None, disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=ds, callbacks=[Clock(), Profile()]).train()
print("TIMES", json.dumps(times))
""" % (MICRO, G // MICRO)


def run(cmd: list[str], env: dict) -> tuple[str, float]:
    """stdout and peak RSS (MiB) of a command in its own process."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        if status:
            raise RuntimeError(f"{' '.join(cmd[:6])} ... failed: {err.read().decode()[-3000:]}")
        return out.read().decode(), usage.ru_maxrss / 1024


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def make_model(work: str, config: str, env: dict) -> tuple[str, str]:
    """A megatrain checkpoint of the preset's shape (random weights, via a 1-step run with lr 0) and its HF export."""
    from megatrain.data.preprocess import preprocess

    src = os.path.join(work, "c.jsonl")
    with open(src, "w") as f:
        for i in range(64):
            f.write(json.dumps({"text": f"text {i} " * 40}) + "\n")
    preprocess([src], "byte", os.path.join(work, "bytes"), append_eod=True)
    ck, hf = os.path.join(work, "ck"), os.path.join(work, "hf")
    sets = {"data.path": os.path.join(work, "bytes"), "data.tokenizer": "byte", "data.seq_len": 64, "data.split": "98,2,0",
            "model.vocab_size": 32000, "model.true_vocab_size": 32000, "train.max_steps": 1, "train.lr": 0.0,
            "train.min_lr": 0.0, "train.warmup_steps": 0, "train.global_batch_size": 2, "train.micro_batch_size": 2,
            "train.eval_interval": 0, "checkpoint.dir": ck, "checkpoint.interval": 0, "logging.tensorboard": False,
            "logging.peak_tflops": 1.0}
    run([sys.executable, "-m", "megatrain.cli", "pretrain", "--config", config]
        + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")], env)
    run([sys.executable, "-m", "megatrain.cli", "convert", "to-hf", ck, "--output", hf, "--no-verify"], env)
    return ck, hf


def make_data(work: str, task: str, seq: int, n: int) -> tuple[str, str]:
    """(megatrain's file, the same examples as token ids for the Trainer). Byte-level text of exactly `seq` tokens
    (classify: + the end-of-document token megatrain appends; sft: plain chat format, no packing)."""
    rng = random.Random(0)
    mt, hf = os.path.join(work, f"{task}.jsonl"), os.path.join(work, f"{task}-ids.jsonl")
    with open(mt, "w") as a, open(hf, "w") as b:
        for _ in range(n):
            if task == "classify":
                text = "".join(rng.choice("abcdefgh ") for _ in range(seq - 1))
                label = rng.randint(0, 1)
                a.write(json.dumps({"text": text, "label": str(label)}) + "\n")
                b.write(json.dumps({"ids": list(text.encode()) + [256], "label": label}) + "\n")
            else:
                prefix = "User: " + "".join(rng.choice("abcdefgh ") for _ in range(seq // 2)) + "\nAssistant: "
                response = "".join(rng.choice("abcdefgh ") for _ in range(seq - len(prefix)))
                a.write(json.dumps({"prompt": prefix[6:-12], "response": response}) + "\n")
                ids = list((prefix + response).encode()) + [256]  # the Trainer's model shifts the labels itself
                b.write(json.dumps({"ids": ids, "labels": [-100] * len(prefix) + ids[len(prefix):]}) + "\n")
    return mt, hf


def megatrain_run(work, ck, task, data, seq, steps, lora, env, profile: bool) -> tuple[float, float, dict | None]:
    """(tokens/s: the median over the timed steps, peak RSS MiB, the split of one more step profiled, or None)."""
    out = os.path.join(work, f"mt-{task}-{lora}")
    shutil.rmtree(out, ignore_errors=True)  # (a run of its own: not a resume of the previous repeat's checkpoint)
    last = WARMUP + steps + (1 if profile else 0)
    sets = {"finetune.init": ck, "finetune.train_file": data, "finetune.epochs": 0, "finetune.max_seq_len": seq + 1,
            "finetune.pack": False, "finetune.lora_rank": lora, "finetune.lora_alpha": 2 * lora if lora else 16,
            "train.max_steps": last, "train.global_batch_size": G, "train.micro_batch_size": MICRO,
            "train.lr": 1e-4, "train.warmup_steps": 0, "train.lr_schedule": "constant", "train.eval_interval": 0,
            "train.log_interval": 1, "checkpoint.dir": out, "checkpoint.interval": 0, "logging.tensorboard": False,
            "logging.profile_step": last if profile else 0}
    _, rss = run([sys.executable, "-m", "megatrain.cli", "finetune", "--config", f"finetune-{task}"]
                 + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")], env)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    timed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and WARMUP < r["step"] <= WARMUP + steps]
    split = next((r for r in rows if r.get("kind") == "profile"), None)
    return median(timed), rss, split


def hf_run(work, hf, task, data, seq, steps, lora, env, profile: bool) -> tuple[float, float, bool, dict | None]:
    """(tokens/s, peak RSS MiB, whether DeepSpeed ran, the split of one more step profiled, or None)."""
    script = os.path.join(work, "hf_train.py")
    with open(script, "w") as f:
        f.write(HF_SCRIPT)
    # A one-rank process group described in the environment, as a launcher would: without it DeepSpeed looks for MPI.
    env = dict(env, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29731")
    last = WARMUP + steps + (1 if profile else 0)
    for use_ds in ("1", "0"):  # the Trainer's DeepSpeed integration, else the plain Trainer
        try:
            text, rss = run([sys.executable, script, task, hf, data, str(last), str(lora),
                             os.path.join(work, "hf-out"), use_ds, str(last if profile else 0)], env)
        except RuntimeError as e:
            if use_ds == "1":
                print(f"  (Trainer + DeepSpeed failed here, the plain Trainer runs: {str(e).splitlines()[-1][:120]})")
                continue
            raise
        times = json.loads(text.split("TIMES", 1)[1].splitlines()[0])[WARMUP: WARMUP + steps]
        split = json.loads(text.split("SPLIT", 1)[1].splitlines()[0]) if "SPLIT" in text else None
        return G * seq / median(times), rss, use_ds == "1", split
    raise RuntimeError("unreachable")


def spread(xs: list[float]) -> dict:
    return dict(min=min(xs), median=median(xs), max=max(xs), runs=xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-125m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lora", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side per task and mode, alternating")
    ap.add_argument("--tasks", default="classify,sft")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_finetune.json"))
    args = ap.parse_args()
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    work = tempfile.mkdtemp(prefix="bench-finetune-")
    ck, hf = make_model(work, args.config, env)
    results = dict(config=args.config, seq=args.seq, global_batch=G, micro_batch=MICRO, lora_rank=args.lora,
                   steps=args.steps, repeats=args.repeats, rows=[])
    print(f"{'task':<10}{'mode':<8}{'megatrain tok/s':>22}{'HF tok/s':>22}{'ratio':>8}{'mt peak MiB':>13}"
          f"{'HF peak MiB':>13}   (median [min-max] of {args.repeats} runs a side)")
    for task in args.tasks.split(","):
        data, ids = make_data(work, task, args.seq, G * (WARMUP + args.steps))
        for lora in (0, args.lora):
            mt, hfs, mt_rss, hf_rss, with_ds, splits = [], [], [], [], True, {}
            for r in range(args.repeats):
                profile = r == args.repeats - 1  # the last repeat profiles one more step on each side
                tps, rss, splits["megatrain"] = megatrain_run(work, ck, task, data, args.seq, args.steps, lora, env,
                                                              profile)
                mt.append(tps)
                mt_rss.append(rss)
                tps, rss, ds, splits["hf"] = hf_run(work, hf, task, ids, args.seq, args.steps, lora, env, profile)
                hfs.append(tps)
                hf_rss.append(rss)
                with_ds = with_ds and ds
            mode = f"LoRA {lora}" if lora else "full"
            row = dict(task=task, mode=mode, megatrain_tokens_per_s=median(mt), hf_tokens_per_s=median(hfs),
                       ratio=median(mt) / median(hfs), megatrain_peak_rss_mib=median(mt_rss),
                       hf_peak_rss_mib=median(hf_rss), hf_with_deepspeed=with_ds,
                       megatrain_spread=spread(mt), hf_spread=spread(hfs),
                       ratio_spread=dict(min=min(mt) / max(hfs), max=max(mt) / min(hfs)), step_time_split=splits)
            results["rows"].append(row)
            print(f"{task:<10}{mode:<8}{median(mt):>8.0f} [{min(mt):.0f}-{max(mt):.0f}]".ljust(40)
                  + f"{median(hfs):>8.0f} [{min(hfs):.0f}-{max(hfs):.0f}]".ljust(22)
                  + f"{row['ratio']:>7.2f}x{median(mt_rss):>13.0f}{median(hf_rss):>13.0f}"
                  + ("" if with_ds else "  (HF without DeepSpeed)"), flush=True)
            for who, sp in splits.items():  # a step goes no faster than its matmuls: the rest is what can go
                if sp:
                    print(f"{'':<10}{who:<10}step: {split_line(sp)}", flush=True)
        full, lo = results["rows"][-2], results["rows"][-1]
        print(f"{'':<10}LoRA peak memory / full: megatrain {lo['megatrain_peak_rss_mib'] / full['megatrain_peak_rss_mib']:.2f}x, "
              f"HF {lo['hf_peak_rss_mib'] / full['hf_peak_rss_mib']:.2f}x")
    write_results(args.out, results, indent=1)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
