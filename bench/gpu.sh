#!/usr/bin/env bash
# The GPU checks in one unattended run (under 10 minutes on one H100/H200), everything under one results folder:
#   1. build megatrain's CUDA kernels (csrc/*.cu) into OUT/build-lib, on half of the cores, while step 2 runs;
#      the built extension is copied into megatrain/ after it                 -> build.log
#   2. checkpoint saves: the training time a synchronous and a background save cost (llama-125m, bf16, one GPU)
#                                                                     -> bench_ckpt.log, bench_ckpt_cuda.json
#   3. the kernels load on this GPU and agree with the reference      -> kernels-check.log
#      (python -m megatrain.kernels --check --require-cuda)
#   4. pytest -m gpu (the kernels against the pure-PyTorch reference) -> pytest-gpu.log
#      a GPU test that was skipped did not check anything: a skip counts as a failed step
#   5. the kernel table: fused vs eager, and bandwidth as a fraction of the device's HBM peak
#                                                                     -> bench_kernels.log, bench_kernels_cuda.json
#   6. llama-1.3b, bf16, 20 steps on this GPU: tokens/s and MFU      -> llama-1.3b.log, llama-1.3b/metrics.jsonl
#   7. model.compile: gpt2-124m blocks eager, compiled per block and whole, bf16
#                                                                     -> bench_compile.log, bench_compile_cuda.json
#
#   bash bench/gpu.sh [RESULTS_DIR]      (default: bench/results/gpu-<date>)
#   GPU_STEPS="build kernels-check" bash bench/gpu.sh DIR     (only the steps named)
#
# Needs a CUDA torch and deepspeed (pip install deepspeed, or the wheels carried to the machine); step 2 reads
# tinyshakespeare from BENCH_DATA (default ../shared/data/tinyshakespeare.txt). On a machine without a CUDA device it
# prints one line and exits with status 2. Each step has its own time limit; a step that fails is recorded in
# summary.txt and the next one still runs; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA device here (torch.cuda.is_available() is false); nothing to run"
  exit 2
fi
OUT=${1:-bench/results/gpu-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())" \
  | tee "$SUMMARY"
failed=0
chosen() { [ -z "${GPU_STEPS:-}" ] || [[ " $GPU_STEPS " == *" $1 "* ]]; }
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log to OUT/NAME.log, note the result
  local name=$1 limit=$2
  shift 2
  chosen "$name" || return 0
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local verdict="ok"
  [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit} s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAILED (exit $rc)"
  [ $rc -ne 0 ] && failed=$((failed + 1))
  printf '%-16s %-24s %4d s   %s\n' "$name" "$verdict" $(( $(date +%s) - t0 )) "$OUT/$name.log" | tee -a "$SUMMARY"
}

export MEGATRAIN_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-8}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
# NOTE: the build goes to OUT/build-lib, not into megatrain/, so that no run of step 2 finds a half-written extension
# (and every run of it trains the same way: without the fused kernels); it runs on the upper half of the cores.
cores=$(nproc)
pin=""
[ "$cores" -ge 8 ] && command -v taskset > /dev/null && pin="taskset -c $((cores / 2))-$((cores - 1))"
step build 300 $pin "$PY" setup.py build_ext --build-lib "$OUT/build-lib" --build-temp "$OUT/build-temp" &
build_pid=$!
# 300 steps of 2,048 tokens, a save every 100: the ~2 GB checkpoint's background write has 100 steps to finish
step bench_ckpt 300 "$PY" bench/bench_ckpt.py --config llama-125m --steps 300 --every 100 --seq 2048 \
  --data "${BENCH_DATA:-../shared/data/tinyshakespeare.txt}" --out "$OUT/bench_ckpt_cuda.json"
wait "$build_pid"
chosen build && ! grep -q "^build  *ok" "$SUMMARY" && failed=$((failed + 1))  # (the step ran in a subshell: count its failure here)
cp "$OUT"/build-lib/megatrain/_C*.so megatrain/ 2>/dev/null
rm -rf "$OUT/build-temp"
step kernels-check 60 "$PY" -m megatrain.kernels --check --require-cuda
step pytest-gpu 90 "$PY" -m pytest -m gpu tests/test_kernels.py -q -rs -p no:cacheprovider
# -rs lists the skips as "SKIPPED [count] file:line: reason"; sum the counts
chosen pytest-gpu && skipped=$(awk '/^SKIPPED \[[0-9]+\]/ { n += substr($2, 2, length($2) - 2) } END { print n + 0 }' "$OUT/pytest-gpu.log")
if [ "${skipped:-0}" -ne 0 ]; then
  failed=$((failed + 1))
  printf '%-16s %-24s %s\n' "pytest-gpu" "FAILED ($skipped skipped)" "a skipped GPU test checked nothing: see $OUT/pytest-gpu.log" \
    | tee -a "$SUMMARY"
fi
step bench_kernels 90 "$PY" bench/bench_kernels.py --device cuda --out "$OUT/bench_kernels_cuda.json"
# 20 optimizer steps of 8 x 2048 tokens on the built-in corpus (its tokenizer and data are built first, once, on the
# CPU); ZeRO-0 on one GPU, no evaluation or checkpoint: the log lines every 5 steps carry tokens/s and MFU
step llama-1.3b 150 "$PY" -m megatrain pretrain --config llama-1.3b --set train.precision=bf16 \
  --set train.max_steps=20 --set train.global_batch_size=8 --set train.micro_batch_size=4 --set train.warmup_steps=2 \
  --set train.log_interval=5 --set train.eval_interval=0 --set checkpoint.interval=0 --set parallel.zero_stage=0 \
  --set logging.tensorboard=false --set checkpoint.dir="$OUT/llama-1.3b"
rm -rf "$OUT"/llama-1.3b/step*  # its final checkpoint (18 GB): only the log and metrics.jsonl are kept
step bench_compile 120 "$PY" bench/bench_compile.py --device cuda --precision bf16 --config gpt2-124m --iters 20 \
  --repeats 2 --out "$OUT/bench_compile_cuda.json"
grep -h "bandwidth\|training step\|speed" "$OUT/bench_kernels.log" 2>/dev/null | tail -n 12 >> "$SUMMARY"
grep -h "lost per save\|inside a save" "$OUT/bench_ckpt.log" 2>/dev/null >> "$SUMMARY"
grep -h "MFU" "$OUT/llama-1.3b.log" 2>/dev/null | tail -n 2 >> "$SUMMARY"
grep -h "ms/iteration" "$OUT/bench_compile.log" 2>/dev/null | tail -n 1 >> "$SUMMARY"
echo "$failed step(s) failed; results in $OUT" | tee -a "$SUMMARY"
exit $failed
