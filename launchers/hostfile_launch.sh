#!/usr/bin/env bash
# Launch megatrain on several nodes over ssh with DeepSpeed's pdsh launcher:
#
#   launchers/hostfile_launch.sh HOSTFILE pretrain|finetune [--config C] [--set section.key=value ...]
#
# Runs `megatrain launch`: a preflight on every host (ssh answers, same venv path and megatrain
# version, data/checkpoint paths visible, master port free; one line per failure), writes
# .deepspeed_env with the variables the ranks need, then `deepspeed --hostfile ... --venv_script`.
# Run it from a directory every node sees at the same path (DeepSpeed starts each rank there).
#
#   MEGATRAIN_VENV   the venv megatrain is installed in, the same path on every node (default: the active one)
#   MASTER_PORT      rank 0's port on the first host (default 29500)
#   MASTER_ADDR      rank 0's address as the other nodes reach it (default: the first host)
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 HOSTFILE pretrain|finetune [--config C] [--set section.key=value ...]" >&2
    exit 2
fi
hostfile=$1
shift
venv=${MEGATRAIN_VENV:-${VIRTUAL_ENV:-}}
if [ -z "$venv" ] || [ ! -f "$venv/bin/activate" ]; then
    echo "$0: error: no venv: activate the one megatrain is installed in, or set MEGATRAIN_VENV" >&2
    exit 1
fi
source "$venv/bin/activate"
exec python -m megatrain.cli launch --hostfile "$hostfile" --venv "$venv" \
    ${MASTER_PORT:+--master-port "$MASTER_PORT"} ${MASTER_ADDR:+--master-addr "$MASTER_ADDR"} "$@"
