"""Measure a layout's memory per rank, for the plan's validation (tests/test_plan.py).

Run in each rank of a gloo job (tests/distributed.py). Three training steps on random tokens through the real Run ->
Transformer -> engine path, and on the last step:
- model states: the tensors that exist between micro-batches (parameters, gradients, optimizer states, DeepSpeed's
  flat buffers and buckets), counted once per storage from every tensor Python can reach plus the parameters'
  gradients, at every point of the step where they peak (after each backward, before and after each optimizer step);
- activations: what the forward pass leaves alive for the backward (autograd's saved tensors, the pipeline's
  buffers), as the growth of the bytes malloc has handed out (all arenas, heap and mmapped blocks) from before a
  forward to after it (for a pipeline: from the start of the step to the last forward before the first backward,
  when the most micro-batches are in flight). The parent sets MALLOC_MMAP_THRESHOLD_ so that malloc mmaps every
  allocation above 16 KiB it cannot cut from free heap space (its default threshold moves as blocks are freed, and
  the figures with it by a few percent).
"""
import ctypes
import gc
import json
import os

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "16384"}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def malloc_bytes() -> int:
    """Bytes in use from malloc: chunks cut from the arenas' heaps plus mmapped blocks. NOTE: both, because malloc
    serves a large request from free heap space when it has some and mmaps it only otherwise; counting the mmapped
    blocks alone read a pipeline stage's activations 0.1-0.4 MiB (up to 10%) low, by chance, from run to run."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def tensor_bytes(module, exclude=()) -> int:
    """Bytes of every distinct tensor storage Python can reach, plus the module's gradients, less `exclude`'s."""
    import torch

    gc.collect()
    storages = {}
    found = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    found += [p.grad for p in module.parameters() if p.grad is not None]
    for t in found:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # meta tensors, sparse
            continue
        if s.device.type == "cpu" and s.nbytes():
            storages[s.data_ptr()] = s.nbytes()
    for t in exclude:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def pipeline_buffers(engine) -> list:
    """The tensors a pipeline engine holds for its micro-batches in flight and its send/receive buffers: counted with
    the activations, not the model states."""
    import torch

    found = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.append(x)
            if x.grad is not None:  # a received activation's gradient, sent back to the previous stage
                found.append(x.grad)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                walk(y)

    walk([engine.pipe_buffers, engine.pipe_recv_buf, engine.grad_layer, engine._grad_layer_buf, engine.meta_buffer])
    return found


def measure(rank, world, sets, out_dir):
    import torch

    from megatrain.config import load_config
    from megatrain.model import Transformer
    from megatrain.tasks.base import is_pipeline
    from megatrain.training.runtime import Run

    cfg = load_config("tiny", sets)
    run = Run.start(cfg)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    engine = run.engine(model, log_ranks=False)
    b, T, V = cfg.train.micro_batch_size, cfg.data.seq_len // run.layout.cp, cfg.model.vocab_size  # (cp: a slice)
    gen = torch.Generator().manual_seed(rank)
    states, acts = [], []
    pipe = is_pipeline(engine)
    if pipe:  # sample inside DeepSpeed's 1F1B schedule: it runs each instruction from its class's _INSTRUCTION_MAP
        from deepspeed.runtime.pipe import schedule

        seen = {"backward": False, "base": None}
        table = dict(engine._INSTRUCTION_MAP)
        fwd, bwd, opt = table[schedule.ForwardPass], table[schedule.BackwardPass], table[schedule.OptimizerStep]

        def forward(self, **k):
            fwd(self, **k)
            if not seen["backward"]:
                acts.append(malloc_bytes() - seen["base"])

        def backward(self, **k):
            seen["backward"] = True
            bwd(self, **k)

        def optimizer_step(self, **k):
            states.append(tensor_bytes(self.module, pipeline_buffers(self)))
            opt(self, **k)
            states.append(tensor_bytes(self.module, pipeline_buffers(self)))

        table.update({schedule.ForwardPass: forward, schedule.BackwardPass: backward,
                      schedule.OptimizerStep: optimizer_step})
        engine._INSTRUCTION_MAP = table
    for step in range(3):
        last = step == 2
        # Python's cyclic collector, run at moments of its own choosing, frees the last step's garbage inside the
        # measured window (CI once measured a last stage's activations 10.9% under the plan, its TP twin 4.1%):
        # collect first, then keep it off while measuring
        gc.collect()
        gc.disable()
        batches = [torch.randint(0, V, (b, T), generator=gen) for _ in range(run.grad_accum)]
        if pipe:
            seen.update(backward=False, base=None)
            for bufs in engine.pipe_buffers.values():  # the last step's micro-batches: replaced during this step
                bufs[:] = [None] * len(bufs)
            seen["base"] = malloc_bytes()
            acts.clear(), states.clear()
            engine.train_batch(iter([(x, x) for x in batches]))
            gc.enable()
            continue
        step_acts = []
        for x in batches:
            before = malloc_bytes()
            loss = engine(x, x)
            step_acts.append(malloc_bytes() - before)
            engine.backward(loss)
            if last:
                states.append(tensor_bytes(engine.module))
            engine.step()
            if last:
                states.append(tensor_bytes(engine.module))
        if step:  # steps 2 and 3; the first allocates what stays for the run
            acts.append(max(step_acts))
        gc.enable()
    # NOTE: the smaller of two steps: malloc's bytes also count a block another thread (gloo's) holds for a moment, which once put a TP rank 18% over the plan in CI while its twin matched it to 2%
    activations = max(acts) if pipe else min(acts)
    out = dict(rank=rank, coords=run.layout.coords(rank), model_states=max(states), activations=activations)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
