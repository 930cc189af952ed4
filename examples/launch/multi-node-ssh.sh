#!/usr/bin/env bash
# One eimctl step on several machines without a scheduler: torchrun on every host over ssh, joined
# by a c10d rendezvous on the first host. The repository (with .venv), the run directory and the
# queue store (eim.queues_dir) must be on a file system every host mounts at the same path.
#
#   NODES="node0 node1" examples/launch/multi-node-ssh.sh train-stage st --run-dir runs/x --config cfg.yaml
#
# The whole schedule: one launch per compute line of `eimctl schedule`, in order, e.g.
#   for stage in st lm base-ie; do
#     NODES="node0 node1" examples/launch/multi-node-ssh.sh train-stage "$stage" --run-dir runs/x --config cfg.yaml
#   done
#
# NODES: hosts, the rendezvous host first. PORT: its free TCP port (default 29500).
# NPROC: processes per host (default `gpu`: one per GPU). WORKDIR: the repository on the shared
# file system (default: the current directory). MAX_RESTARTS: torchrun restarts all ranks after a
# failure (default 2); the stage then resumes from its last checkpoint (`--resume auto`, the default).
# The static alternative to c10d is `--node_rank i --master_addr HEAD --master_port PORT` per host.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: NODES=\"node0 node1\" $0 EIMCTL_COMMAND [ARGS...]" >&2
  exit 2
fi
read -r -a hosts <<< "${NODES:?set NODES to the hosts, rendezvous host first, e.g. NODES=\"node0 node1\"}"
head=${hosts[0]}
workdir=${WORKDIR:-$PWD}
rdzv_id=${RDZV_ID:-eim-$(date +%s)-$$}   # the same id on every host: one job
command=$(printf '%q ' "$@")

pids=()
for host in "${hosts[@]}"; do
  ssh -n "$host" "cd $(printf '%q' "$workdir") && .venv/bin/torchrun \
    --nnodes ${#hosts[@]} --nproc_per_node ${NPROC:-gpu} \
    --rdzv_id $rdzv_id --rdzv_backend c10d --rdzv_endpoint $head:${PORT:-29500} \
    --max-restarts ${MAX_RESTARTS:-2} --no-python .venv/bin/eimctl $command" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
