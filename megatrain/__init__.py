"""megatrain: pretrain and fine-tune model-parallel Transformer language models on DeepSpeed."""
__version__ = "0.1.0"
