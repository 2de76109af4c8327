"""Checkpoints: megatrain's native (DeepSpeed) checkpoints and what reads them.

    io.py       save / resume under the run's own layout, `latest`, megatrain.json, RNG states
    reader.py   any layout (ZeRO 0-3, TP, PP, and their mixes) -> full tensors, one at a time: the ONE reader that
                consolidate, reshard, to-hf, generate and fine-tuning all use
    stream.py   safetensors written one tensor at a time
"""
