"""megatrain: train large Transformer language models from scratch on DeepSpeed.

Install the CPU torch that lies on disk first (`pip install torch==2.13.0`), or keep your own CUDA
torch: the range below is satisfied by both, so pip never replaces the torch you already have.
"""
import glob

from setuptools import find_packages, setup

setup(
    name="megatrain",
    version="0.1.0",
    description="Pretrain and fine-tune model-parallel Transformer LMs on DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["megatrain", "megatrain.*"]),
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
        "wandb>=0.18",
        "tensorboard>=2.15",
        "ninja",
    ],
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3"]},
    # Presets and DeepSpeed JSONs, for non-editable installs (found under <prefix>/share/megatrain).
    data_files=[("share/megatrain/configs", sorted(glob.glob("configs/*.yaml"))),
                ("share/megatrain/ds_configs", sorted(glob.glob("ds_configs/*.json")))],
    entry_points={"console_scripts": ["megatrain=megatrain.cli:main"]},
)
