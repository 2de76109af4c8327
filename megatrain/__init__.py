"""megatrain: pretrain and fine-tune model-parallel Transformer language models on DeepSpeed."""
import time as _time

__version__ = "0.1.0"
STARTED = _time.perf_counter()  # the start of a command's start-up (megatrain/startup.py splits it)
