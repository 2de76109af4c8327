"""Planning a run before spending a cluster on it: per-rank memory (memory.py), step time (timing.py) and the
search over layouts (search.py), printed by `megatrain plan` (megatrain/plan.py).

Every figure follows what megatrain and DeepSpeed really do, as measured on this project's CPU runs
(tests/test_plan.py runs each layout the CPU tests run and compares): which tensors autograd saves in each layer,
what DeepSpeed's ZeRO stages keep per precision, how the pipeline holds micro-batches in flight.
"""
