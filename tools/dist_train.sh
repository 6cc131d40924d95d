#!/usr/bin/env bash
# Distributed training with torchrun: tools/dist_train.sh CONFIG NUM_PROCS [train.py args]
# With CUDA: one process per GPU (NUM_PROCS <= the GPUs visible), nccl backend. Without CUDA:
# gloo backend, one process per CPU worker. See mmdet_anchorloss/engine/launch.py.
# NNODES, NODE_RANK, MASTER_ADDR and PORT as in mmdet.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG NUM_PROCS [tools/train.py arguments]" >&2
  exit 2
fi
CONFIG=$1
NUM_PROCS=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
TOOLS_DIR=$(dirname "$0")
# The project venv when there is one (make install), else python on PATH.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python
  [ -x "$TOOLS_DIR/../.venv/bin/python" ] && PYTHON="$TOOLS_DIR/../.venv/bin/python"
fi

GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$GPUS" -gt 0 ]; then
  if [ "$NUM_PROCS" -gt "$GPUS" ]; then
    echo "$0: NUM_PROCS=$NUM_PROCS but torch sees $GPUS GPU(s): one process per GPU" >&2
    exit 2
  fi
  echo "[dist_train] $NUM_PROCS process(es) on $GPUS visible GPU(s), nccl backend (unless the config names another)"
else
  echo "[dist_train] no CUDA GPU: $NUM_PROCS CPU process(es), gloo backend"
fi

PYTHONPATH="$TOOLS_DIR/..${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" \
  --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" \
  --nproc_per_node="$NUM_PROCS" \
  --master_port="$PORT" \
  "$TOOLS_DIR/train.py" \
  "$CONFIG" \
  --launcher pytorch "$@"
