#!/bin/bash
# Train without SLURM, with the same arguments as jobs/train.sbatch; the rank count comes from
# the config (`python -m dbmpi launch`), the output goes to the terminal and to logs/.
#   jobs/local.sh CONFIG [--set section.key=value ...]
set -o pipefail
source "$(dirname "${BASH_SOURCE[0]}")/site.sh"
[ $# -ge 1 ] || { sed -n '2,4p' "$0" >&2; exit 2; }
mkdir -p logs
log=logs/$(basename "$1" .toml)-local-$(date +%Y%m%d-%H%M%S).out
echo "dbmpi: local run, log $log: $*"
python -m dbmpi launch "$@" 2>&1 | tee "$log"
