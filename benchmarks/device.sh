#!/usr/bin/env bash
# One prepared run on a GPU machine: the benchmarks at COCO scale, then the demo's training stages, on CUDA.
#
#   bash benchmarks/device.sh            # from the repository root; results under $OUT (default /tmp/eimctl-device)
#
# Meant for a machine that already has PyTorch with CUDA (and transformers, pyarrow, typer, rich, safetensors):
# missing pure-Python packages can be put in .whl/ as wheels (open_clip_torch, ftfy, wcwidth) and are installed
# into /tmp/site. The demo's pretrained models must be in demo/models (`make demo` builds them; copy them over);
# the demo data is regenerated here (deterministic, a few seconds). Evaluation (Java + pycocoevalcap) is not run
# here: the trained weights are packed under $OUT so `eimctl evaluate` can score them elsewhere.
# Each part has its own time limit and a failure in one does not stop the others. A quick rehearsal on a CPU:
#   OUT=/tmp/rehearsal PY=.venv/bin/python BENCH_SCALE=small BENCH_ARGS="--only generate" \
#       DEMO_OVERRIDES="train.max_steps=3" bash benchmarks/device.sh
set -u
OUT=${OUT:-/tmp/eimctl-device}
mkdir -p "$OUT"
PY=${PY:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
EIM="$PY -m eimctl"
RUNS=/tmp/eimctl-runs

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/machine.txt"
$PY -c "import torch, transformers, open_clip, pyarrow; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| open_clip', open_clip.__version__, '| cuda', torch.cuda.is_available())" \
    2>&1 | tee -a "$OUT/machine.txt"

step() {  # step <seconds> <label> <command...>: run with a time limit, log, report wall time and exit code
    local limit=$1 label=$2; shift 2
    local start=$(date +%s%N)
    timeout "$limit" "$@" >>"$OUT/demo.log" 2>&1
    local rc=$?
    local ms=$(( ($(date +%s%N) - start) / 1000000 ))
    printf '%-34s exit %3d  %4d.%03d s\n' "$label" "$rc" $((ms / 1000)) $((ms % 1000)) | tee -a "$OUT/steps.txt"
}

# 1. Benchmarks (printed figures go to bench.log; RESULTS.md holds this machine's section).
start=$(date +%s)
timeout "${BENCH_SECONDS:-300}" $PY benchmarks/run.py --scale "${BENCH_SCALE:-full}" \
    --results "$OUT/RESULTS.md" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
echo "benchmarks: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"

# 2. The demo's training stages on CUDA (defaults: float32, queues copied to the GPU).
if [ -d demo/models/clip ] && [ -d demo/models/lm ]; then
    step 120 "demo-data" $EIM demo-data --out demo/data
    step 200 "clipcap: train-stage base" $EIM train-stage base --run-dir $RUNS/clipcap --config examples/demo.yaml ${DEMO_OVERRIDES:-}
    step 120 "eim: build-queues" $EIM build-queues --config examples/demo-eim.yaml
    for stage in st lm base-ie base st-base lm-base; do
        step 200 "eim: train-stage $stage" $EIM train-stage $stage --run-dir $RUNS/eim --config examples/demo-eim.yaml ${DEMO_OVERRIDES:-}
    done
    $PY - "$RUNS" <<'EOF' 2>&1 | tee -a "$OUT/steps.txt"
import json, sys
from pathlib import Path
for manifest in sorted(Path(sys.argv[1]).glob("*/stages/*/manifest.json")):
    m = json.loads(manifest.read_text())
    s = m.get("summary", {})
    print(f"{manifest.parent.parent.parent.name}/{manifest.parent.name}: {m.get('wall_seconds', 0):.1f} s wall, "
          f"{s.get('steps')} steps, {s.get('samples_per_s', 0):.0f} samples/s, final loss {s.get('final_loss')}, "
          f"device {m.get('device')}")
EOF
    # Weights + manifests for scoring elsewhere (each archive stays under 16 MiB).
    tar -C $RUNS -cf "$OUT/clipcap.tar" --exclude=cache clipcap 2>/dev/null
    tar -C $RUNS -cf "$OUT/eim-base-ie.tar" eim/stages/base-ie 2>/dev/null
    tar -C $RUNS -cf "$OUT/eim-logs.tar" --exclude='*.safetensors' --exclude=cache eim 2>/dev/null
else
    echo "demo/models missing: demo stages skipped (run make demo, then copy demo/models here)" | tee -a "$OUT/steps.txt"
fi
grep -E "^\[|^\*|ratio|speed-up|failed" "$OUT/bench.log" | cut -c1-200
cat "$OUT/steps.txt"
