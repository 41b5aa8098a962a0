#!/usr/bin/env bash
# The deepspeed launcher over a hostfile: run once, on the first host of the hostfile. deepspeed reaches
# the other hosts over passwordless ssh (pdsh), as usual. See launch/hostfile.example.
# Edit here:
EXPERIMENT=${EXPERIMENT:-qwen2_5_1_5b_pretrain}
HOSTFILE=$(realpath -m "${HOSTFILE:-$(dirname "$0")/hostfile}")  # a relative HOSTFILE: from where you run this
cd "$(dirname "$0")/.."
if [ ! -f "$HOSTFILE" ]; then
    echo "error: launch/deepspeed.sh: no hostfile at $HOSTFILE; copy launch/hostfile.example to launch/hostfile" \
         "and list your hosts (\"<host> slots=<gpus>\" per line), or set HOSTFILE=<file>" >&2
    exit 2
fi
NNODES=${NNODES:-$(grep -cE '^[^#[:space:]]' "$HOSTFILE" || true)}
if [ "$NNODES" -lt 1 ]; then
    echo "error: launch/deepspeed.sh: $HOSTFILE lists no host; write \"<host> slots=<gpus>\" per line" >&2
    exit 2
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
set -euo pipefail
PIPELINE=${PIPELINE:-$( [ -x .venv/bin/pipeline ] && echo .venv/bin/pipeline || echo pipeline )}
exec "$PIPELINE" run experiment="$EXPERIMENT" launcher=deepspeed launcher.hostfile="$HOSTFILE" \
    launcher.nnodes="$NNODES" launcher.nproc_per_node="$GPUS_PER_NODE" launcher.master_port="$MASTER_PORT" "$@"
