#!/usr/bin/env bash
# A DeepSpeed hostfile (`HOST slots=N` per node) from a Slurm node list or a plain list of hosts:
#
#   launchers/make_hostfile.sh --slots 8 > hostfile                        # inside an allocation
#   launchers/make_hostfile.sh --nodes "gpu[01-04,09]" --slots 8 --output hostfile
#   launchers/make_hostfile.sh --nodes "10.0.0.1,10.0.0.2" --slots 4 --output hostfile
set -euo pipefail
exec python -m megatrain.cli hostfile "$@"
