#!/usr/bin/env bash
# The whole schedule of a config on one machine with several GPUs: every step of
# `eimctl schedule` in order, each compute step as one torchrun launch (one process per GPU).
#
#   examples/launch/single-node.sh RUN_DIR [eimctl config arguments...]
#   examples/launch/single-node.sh runs/coco-eim --config examples/coco-eim.yaml data.path=/data/coco/dataset_coco.json
#
# NPROC: processes per launch (default `gpu`: one per visible GPU; NPROC=2 runs 2 gloo ranks on a CPU).
# MAX_RESTARTS: torchrun restarts all ranks after a failure (default 2); a restarted stage resumes
# from its last checkpoint (`--resume auto`, the default). Rerunning the script skips complete steps.
# VENV: the environment with eimctl (default: the repository's .venv).
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 RUN_DIR [--config CFG.yaml ...] [KEY=VALUE ...]" >&2
  exit 2
fi
RUN_DIR=$1
shift
if [ "$(printf '%q' "$RUN_DIR")" != "$RUN_DIR" ]; then
  echo "RUN_DIR must be a plain path (no spaces or shell characters): $RUN_DIR" >&2
  exit 2
fi
VENV=${VENV:-$(cd "$(dirname "$0")/../.." && pwd)/.venv}
export PATH="$VENV/bin:$PATH"
LAUNCHER="torchrun --standalone --nproc_per_node ${NPROC:-gpu} --max-restarts ${MAX_RESTARTS:-2} --no-python"

# build-queues, every stage (each after the stage it starts from), every evaluation, the report.
plan=$(eimctl schedule "$@" --run-dir "$RUN_DIR" --launcher "$LAUNCHER")
mapfile -t steps <<< "$plan"
for step in "${steps[@]}"; do
  echo "+ ${step%%    #*}" >&2
  eval "$step" < /dev/null   # the lines are printed shell-quoted by `eimctl schedule`
done
