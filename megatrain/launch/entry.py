"""`python .../megatrain/launch/entry.py pretrain ARGS...` = `python -m megatrain.pretrain ARGS...`.

For launchers that take a script path but no `-m` (DeepSpeed's slurm launcher runs `srun python SCRIPT`).
"""
import runpy
import sys

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: entry.py ENTRYPOINT [ARGS...]  (ENTRYPOINT: pretrain, finetune)")
    name = sys.argv.pop(1)
    sys.argv[0] = f"megatrain.{name}"
    runpy.run_module(f"megatrain.{name}", run_name="__main__", alter_sys=True)
