#!/usr/bin/env bash
# torchrun on one node or several (static rendezvous at MASTER_ADDR:MASTER_PORT).
# One node, all its GPUs:
#   bash launchers/torchrun.sh --config configs/quickstart.yaml train.max_steps=200
# Two nodes: run on each, NODE_RANK=0 on the node whose address is MASTER_ADDR:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launchers/torchrun.sh --config FILE key=value ...
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launchers/torchrun.sh --config FILE key=value ...
# Environment: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (the GPUs in CUDA_VISIBLE_DEVICES,
# else those nvidia-smi lists, else 1), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500).
# Every argument goes to `flowpre train` as it is. torchrun gives each process its global
# RANK (data shards, seeds, who writes metrics) and its LOCAL_RANK (which GPU); this
# script sets neither.
set -euo pipefail

gpu_count() {
    local n=0
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        n=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .) || n=0
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') || n=0
    fi
    if [ "$n" -gt 0 ]; then echo "$n"; else echo 1; fi
}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpu_count)}
MASTER_PORT=${MASTER_PORT:-29500}
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    echo "torchrun.sh: NNODES=$NNODES but MASTER_ADDR is not set; using 127.0.0.1 (this host only)" >&2
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [ "$NODE_RANK" -lt 0 ] || [ "$NODE_RANK" -ge "$NNODES" ]; then
    echo "torchrun.sh: NODE_RANK=$NODE_RANK is outside 0..$((NNODES - 1)) (NNODES=$NNODES)" >&2
    exit 2
fi

exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m flowpre.cli train "$@"
