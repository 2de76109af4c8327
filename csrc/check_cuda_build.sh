#!/usr/bin/env bash
# Compile and link the CUDA build of megatrain._C (csrc/*.cu + csrc/*.cpp) against a CUDA torch, on a
# machine without a GPU. The CPU torch cannot build .cu files, so this uses its own venv with the CUDA
# torch (torch==2.14.1, ~5.4 GB; on this project's machines pip takes it from local disk).
# Run it whenever a .cu file changes:   bash csrc/check_cuda_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MEGATRAIN_CUDA_VENV:-$HOME/.cache/megatrain/cuda-build-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.14.1 ninja setuptools numpy
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export MEGATRAIN_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
"$CUDA_HOME/bin/nvcc" --version | tail -1
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
start=$(date +%s)
"$VENV/bin/python" setup.py -q build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp"
so=$(ls "$OUT"/lib/megatrain/_C*.so)
# every CUDA kernel is in the linked library, next to the CPU ops
nm -C "$so" > "$OUT/symbols.txt"
for k in rms_fwd_kernel rms_bwd_kernel ln_fwd_kernel ln_bwd_kernel norm_param_grad_kernel rope_kernel \
         swiglu_fwd_kernel swiglu_bwd_kernel bias_gelu_fwd_kernel bias_gelu_bwd_kernel column_sum_kernel \
         ce_stats_kernel ce_grad_kernel; do
  grep -q "__device_stub.*${k}" "$OUT/symbols.txt" || { echo "missing CUDA kernel $k in $so"; exit 1; }
done
images=""
if [ -x "$CUDA_HOME/bin/cuobjdump" ]; then images=", $("$CUDA_HOME/bin/cuobjdump" --list-elf "$so" | wc -l) device images"; fi
echo "OK: $(basename "$so") compiled and linked in $(( $(date +%s) - start )) s; all 13 CUDA kernels present$images (arch $TORCH_CUDA_ARCH_LIST)"
