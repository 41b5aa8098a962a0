#!/usr/bin/env bash
# The deepspeed launcher over a hostfile: run once, on the first host of the hostfile. deepspeed reaches
# the other hosts over passwordless ssh (pdsh), as usual. See launch/hostfile.example.
# Edit here:
EXPERIMENT=${EXPERIMENT:-qwen2_5_1_5b_pretrain}
HOSTFILE=${HOSTFILE:-launch/hostfile}
NNODES=${NNODES:-$(grep -cE '^[^#[:space:]]' "$HOSTFILE")}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
set -euo pipefail
cd "$(dirname "$0")/.."
PIPELINE=${PIPELINE:-$( [ -x .venv/bin/pipeline ] && echo .venv/bin/pipeline || echo pipeline )}
exec "$PIPELINE" run experiment="$EXPERIMENT" launcher=deepspeed launcher.hostfile="$HOSTFILE" \
    launcher.nnodes="$NNODES" launcher.nproc_per_node="$GPUS_PER_NODE" launcher.master_port="$MASTER_PORT" "$@"
