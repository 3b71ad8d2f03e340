#!/usr/bin/env bash
# Launch a megatron_a1 program on one or many nodes with torchrun.
#
# Single node, 8 GPUs:
#   NPROC_PER_NODE=8 examples/launch/torchrun.sh tools/demo_moe_ep.py --expert-parallel 8
# Multi-node (run the same command on every node; node 0's address is the rendezvous):
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=4 NODE_RANK=$i NPROC_PER_NODE=8 \
#       examples/launch/torchrun.sh tools/demo_moe_ep.py --expert-parallel 8
# On CPU (gloo), NPROC_PER_NODE processes run on this machine.
set -euo pipefail
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
PY=${PY:-python}
exec "$PY" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    "$@"
