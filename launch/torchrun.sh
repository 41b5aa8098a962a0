#!/usr/bin/env bash
# Multi-node torchrun: run this same script on every node, with NODE_RANK set (0 on the first node).
# Node 0 runs every stage (data, import, train, export); the other nodes wait for its train stage and
# join the c10d rendezvous. RUN_DIR must be on storage every node sees.
#   NODE_RANK=0 launch/torchrun.sh        # on node0
#   NODE_RANK=1 launch/torchrun.sh        # on node1
# Edit here:
EXPERIMENT=${EXPERIMENT:-llama2_7b_continue}
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER=${MASTER:-node0:29500}           # node 0's host:port, reachable from every node
RUN_DIR=${RUN_DIR:-runs/$EXPERIMENT}
set -euo pipefail
cd "$(dirname "$0")/.."
PIPELINE=${PIPELINE:-$( [ -x .venv/bin/pipeline ] && echo .venv/bin/pipeline || echo pipeline )}
exec "$PIPELINE" run experiment="$EXPERIMENT" run_dir="$RUN_DIR" launcher=torchrun \
    launcher.nnodes="$NNODES" launcher.nproc_per_node="$GPUS_PER_NODE" launcher.rdzv_endpoint="$MASTER" \
    launcher.node_rank="${NODE_RANK:?set NODE_RANK: 0 on the first node, 1.. on the others}" "$@"
