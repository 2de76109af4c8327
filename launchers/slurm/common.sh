# Sourced by launchers/slurm/*.sbatch. `megatrain_slurm_main ENTRYPOINT ARGS...` runs megatrain.ENTRYPOINT
# on every rank of this allocation, in the mode MEGATRAIN_LAUNCH_MODE names:
#
#   srun              (default) one Slurm task per rank, started by srun; no ssh, no DeepSpeed launcher.
#   deepspeed-slurm   `deepspeed --launcher slurm`: DeepSpeed's runner calls `srun -n RANKS` itself.
#   deepspeed-nossh   one `deepspeed --no_ssh --node_rank N` per node (srun, one task per node), each
#                     starting its node's ranks as a single-node launch would.
#
# MASTER_ADDR is the first node's address (`scontrol show node`: NodeAddr), MASTER_PORT is derived from the
# job id unless set, and the hostfile is written from SLURM_JOB_NODELIST. When megatrain stops early (the
# USR1 of `#SBATCH --signal=USR1@120`, SIGTERM, or train.exit_duration_minutes) it saves a checkpoint, exits 0
# and leaves a note in MEGATRAIN_STOP_FILE; then this requeues the job, and the next run resumes.

megatrain_slurm_main() {
    set -uo pipefail
    local entry=$1
    shift
    local venv=${MEGATRAIN_VENV:-${VIRTUAL_ENV:-}}
    if [ -n "$venv" ]; then
        # shellcheck disable=SC1091
        source "$venv/bin/activate" || { echo "megatrain: error: cannot activate the venv $venv (MEGATRAIN_VENV)" >&2; return 1; }
    fi
    if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('megatrain.$entry') is None)" 2>/dev/null; then
        echo "megatrain: error: python ($(command -v python)) has no megatrain.$entry: set MEGATRAIN_VENV to the venv megatrain is installed in" >&2
        return 1
    fi
    local mode=${MEGATRAIN_LAUNCH_MODE:-srun}
    local first per_node work rc=0
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}
    export MASTER_ADDR=${MASTER_ADDR:-$first}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    per_node=${SLURM_NTASKS_PER_NODE:-$((SLURM_NTASKS / SLURM_NNODES))}
    per_node=${per_node%%(*}  # "8(x2)" -> "8"
    work=${MEGATRAIN_JOB_DIR:-$SLURM_SUBMIT_DIR/.megatrain/slurm-$SLURM_JOB_ID}
    mkdir -p "$work"
    python -m megatrain.cli hostfile --slots "$per_node" --output "$work/hostfile" || return 1
    export MEGATRAIN_STOP_FILE=$work/stopped
    rm -f "$MEGATRAIN_STOP_FILE"
    echo "megatrain: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x $per_node rank(s)," \
         "mode $mode, master $MASTER_ADDR:$MASTER_PORT, hostfile $work/hostfile"
    case "$mode" in
        srun)
            srun --kill-on-bad-exit=1 --ntasks="$SLURM_NTASKS" python -u -m "megatrain.$entry" "$@" || rc=$? ;;
        deepspeed-slurm)
            # --force_multi: with one node DeepSpeed would otherwise quietly start a local launch. Its srun ranks
            # read MASTER_ADDR/PORT from the environment; --master_addr only spares the runner an ssh to node 1.
            # This launcher runs `srun python SCRIPT` (no -m): megatrain/launch/entry.py is that script.
            python -m deepspeed.launcher.runner --hostfile "$work/hostfile" --launcher slurm --force_multi \
                --no_ssh_check --launcher_args=--kill-on-bad-exit=1 --master_addr "$MASTER_ADDR" \
                --master_port "$MASTER_PORT" "$(python -c 'import megatrain.launch.entry as e; print(e.__file__)')" \
                "$entry" "$@" || rc=$? ;;
        deepspeed-nossh)
            # NOTE: Slurm signals every process of the step; the per-node DeepSpeed launchers must survive the
            # USR1 (ignored, inherited) while the ranks, which install their own handler, checkpoint and exit.
            srun --kill-on-bad-exit=1 --ntasks="$SLURM_NNODES" --ntasks-per-node=1 bash -c \
                'trap "" USR1; exec python -m deepspeed.launcher.runner --hostfile "$0" --no_ssh \
                 --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
                 --module "megatrain.$1" "${@:2}"' "$work/hostfile" "$entry" "$@" || rc=$? ;;
        *)
            echo "megatrain: error: MEGATRAIN_LAUNCH_MODE=$mode: use srun, deepspeed-slurm or deepspeed-nossh" >&2
            return 2 ;;
    esac
    if [ "$rc" -eq 0 ] && [ -f "$MEGATRAIN_STOP_FILE" ]; then
        echo "megatrain: stopped early ($(cat "$MEGATRAIN_STOP_FILE")); requeueing job $SLURM_JOB_ID to resume"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
