"""megatrain: train large Transformer language models from scratch on DeepSpeed.

Install the CPU torch that lies on disk first (`pip install torch==2.13.0`), or keep your own CUDA
torch: the range below is satisfied by both, so pip never replaces the torch you already have.

The fused kernels in csrc/ are compiled here, against the torch already installed, which is why the
README installs with `--no-build-isolation` (an isolated build would have no torch, or download one).
The CPU extension is always built; the CUDA sources too when torch has CUDA and nvcc is found.
MEGATRAIN_BUILD_CUDA=0/1 forces the choice; MEGATRAIN_BUILD_KERNELS=0 skips the extension entirely.
"""
import glob
import os
import sys

from setuptools import find_packages, setup


def cpu_arch_flags() -> list[str]:
    """Vector width for the CPU kernels: MEGATRAIN_CPU_ARCH (e.g. native, x86-64-v3), else AVX2+FMA
    (x86-64-v3) when the build machine has it, else the compiler's baseline. Build on the CPU type the
    job runs on: a v3 build stops with an illegal instruction on a CPU without AVX2."""
    arch = os.environ.get("MEGATRAIN_CPU_ARCH")
    if arch:
        return [f"-march={arch}"]
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return []
    return ["-march=x86-64-v3"] if (" avx2" in flags and " fma" in flags and " bmi2" in flags) else []


def pip_cuda_include_dirs() -> list[str]:
    """Headers of the nvidia-* pip wheels a CUDA torch depends on (cuSPARSE, cuBLAS, ...): a CUDA toolkit
    without them (only nvcc and the runtime) still builds against torch's headers."""
    try:
        import nvidia
    except ImportError:
        return []
    roots = list(getattr(nvidia, "__path__", []))
    return sorted(d for r in roots for d in glob.glob(os.path.join(r, "*", "include")) if os.path.isdir(d))


def kernel_extensions():
    if os.environ.get("MEGATRAIN_BUILD_KERNELS", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("megatrain: torch is not importable in this build environment, so the fused kernels are not built "
              "(the PyTorch reference runs instead); install torch first and use pip install --no-build-isolation",
              file=sys.stderr)
        return [], {}
    force = os.environ.get("MEGATRAIN_BUILD_CUDA")
    cuda = (force == "1") or (force is None and torch.version.cuda is not None and CUDA_HOME is not None)
    cpp = ["csrc/registration.cpp", "csrc/cpu_kernels.cpp"]
    # no errno, no FP traps: lets GCC vectorise loops with min/max/floor and the polynomial exp
    # -g0: no debug info (Python's own CFLAGS add -g), which halves the compile of torch's headers
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-DMEGATRAIN_CPU"] + cpu_arch_flags()
    if cuda:
        # no --use_fast_math: its approximate tanh is off by ~1e-5 in fp32 GELU, and these kernels are memory-bound
        ext = CUDAExtension("megatrain._C", cpp + ["csrc/cuda_kernels.cu"], extra_link_args=["-fopenmp"],
                            include_dirs=pip_cuda_include_dirs(),
                            extra_compile_args={"cxx": cxx + ["-DMEGATRAIN_CUDA"], "nvcc": ["-O3"]})
    else:
        ext = CppExtension("megatrain._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = kernel_extensions()

setup(
    name="megatrain",
    version="0.1.0",
    description="Pretrain and fine-tune model-parallel Transformer LMs on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["megatrain", "megatrain.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        # A range, not a pin: 2.13.0 (CPU, on disk here) and a user's own CUDA build both satisfy it.
        "torch>=2.4,<2.15",
        # Pinned exactly: DeepSpeed's API drifts between minor releases.
        "deepspeed==0.19.8",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "numpy>=1.26",
        "pyarrow>=15",
        "pyyaml>=6",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "seqeval>=1.2",  # entity-level NER scores (the conlleval rules)
        "rouge-score>=0.1.2",  # sft generation metrics: ROUGE-1/2/L
        "sacrebleu>=2.0",  # sft generation metrics: corpus BLEU and chrF
        "matplotlib>=3.7",  # megatrain plot (Agg backend, no display)
        "wandb>=0.18",
        "tensorboard>=2.15",
        "ninja",
        "fastapi>=0.110",  # megatrain serve: the OpenAI-compatible API
        "uvicorn>=0.29",
        "sse-starlette>=2.0",  # its streamed responses (server-sent events)
    ],
    extras_require={"eval": ["lm-eval>=0.4,<0.5"],
                    "bench": ["peft>=0.10"],  # bench_finetune: the Trainer's LoRA
                    # accelerate: lm-eval's hf model; trl: the DPO parity test (TRL's DPOTrainer); openai: the
                    # real client against megatrain serve; pytest-xdist: CI's slow tier on both cores
                    "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "hypothesis>=6",
                             "lm-eval>=0.4,<0.5", "accelerate", "trl>=1.16", "openai>=1.40"]},
    # Presets and DeepSpeed JSONs, for non-editable installs (found under <prefix>/share/megatrain).
    data_files=[("share/megatrain/configs", sorted(glob.glob("configs/*.yaml"))),
                ("share/megatrain/ds_configs", sorted(glob.glob("ds_configs/*.json")))],
    entry_points={"console_scripts": ["megatrain=megatrain.cli:main"]},
)
