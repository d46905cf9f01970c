#!/usr/bin/env bash
# Train with ppdreambooth.
#   bash run_train.sh                                   the built-in tiny demo, end to end (CPU, minutes)
#   bash run_train.sh configs/sd15_full.json [--flag value ...]   a JSON config; flags override it
#   bash run_train.sh --pretrained_model_name_or_path ... [--flag value ...]   flags only
# Several devices: add --gpus 0,1,2,3 (or set PPDB_GPUS=0,1,2,3); on CPU, --nproc_per_node 2
# (or PPDB_NPROC=2). Both start `python -m paddle.distributed.launch`.
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/scripts/env.sh"
ppdb_install ""
cd "$PPDB_ROOT"

if [ $# -eq 0 ]; then
  exec "$PY" -m ppdreambooth.demo
fi

GPUS=${PPDB_GPUS:-}
NPROC=${PPDB_NPROC:-}
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) GPUS=$2; shift 2 ;;
    --gpus=*) GPUS=${1#--gpus=}; shift ;;
    --nproc_per_node) NPROC=$2; shift 2 ;;
    --nproc_per_node=*) NPROC=${1#--nproc_per_node=}; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if [ -n "$GPUS" ]; then
  exec "$PY" -u -m paddle.distributed.launch --gpus "$GPUS" scripts/train_entry.py "${ARGS[@]}"
elif [ -n "$NPROC" ] && [ "$NPROC" -gt 1 ]; then
  exec "$PY" -u -m paddle.distributed.launch --nproc_per_node "$NPROC" scripts/train_entry.py "${ARGS[@]}"
else
  exec "$PY" -u -m ppdreambooth.train "${ARGS[@]}"
fi
