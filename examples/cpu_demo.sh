#!/usr/bin/env bash
# The CPU demo (`make demo`): a tiny Agents-A1-style hybrid MoE on 2 gloo ranks with EP=2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "== runtime: tiny hybrid MoE, 2 gloo ranks, expert parallel 2 (alltoall dispatcher)"
"$PY" -m torch.distributed.run --standalone --nproc-per-node 2 tools/demo_moe_ep.py \
    --expert-parallel 2 --steps 40
