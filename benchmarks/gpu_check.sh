#!/usr/bin/env bash
# One short check on a lent GPU machine (< 5 minutes): the cuda-marked tests and the engine
# benchmarks (torch CUDA with and without CUDA graphs, TensorRT where importable, the CPU
# back-ends for reference), all results as files under $OUT.
#
#   bash benchmarks/gpu_check.sh          # on the GPU machine, from anywhere in the repository
#
# That machine has torch (CUDA), numpy 2, onnx, onnxruntime (CPU provider), OpenCV and pytest,
# but no mediapipe, TensorRT, tqdm or platformdirs, and nothing can be installed there. The engines
# and the benchmark need none of them. The astronaut's rig comes from benchmarks/data/ (made with
# mediapipe on the CPU machine): the saved rig while it fits the decoder, else rebuilt there from
# the saved portrait analysis. To refresh both (optional, after decoder or portrait changes):
#     python -m engines.export --save-rig && git add benchmarks/data/
#
# Every step has its own time limit and the script goes on after a failure; $OUT/summary.json
# lists each step's exit status and seconds. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VASA_AVATAR_CACHE="${VASA_AVATAR_CACHE:-$(mktemp -d)}"  # private ONNX/plan cache, no platformdirs needed
export PYTHONDONTWRITEBYTECODE=1
AUDIO_MODEL=dsp
[ -f engines/weights/audio_encoder.pt ] && AUDIO_MODEL=trained
FRAMES=${FRAMES:-500}  # per GPU benchmark
CPU_FRAMES=${CPU_FRAMES:-200}
BUDGET_S=${BUDGET_S:-270}  # all steps together, so that the whole script ends within 5 minutes
START=$(date +%s)
STEPS=()
FAILED=0

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

step() {  # step NAME LIMIT_S COMMAND... : run within min(LIMIT_S, time left), log, record status and seconds
  local name=$1 limit=$2; shift 2
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 15 ]; then
    echo "=== $name: skipped, ${remaining}s left of the ${BUDGET_S}s budget" | tee -a "$OUT/gpu_check.log"
    STEPS+=("{\"step\": \"$name\", \"exit\": null, \"skipped\": true}")
    FAILED=1
    return 0
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  local t0 rc dt
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
  timeout --kill-after=5 "$limit" "$@" >>"$OUT/gpu_check.log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  echo "=== $name: exit $rc after ${dt}s" | tee -a "$OUT/gpu_check.log"
  STEPS+=("{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $dt}")
  [ "$rc" -ne 0 ] && FAILED=1
  return 0
}

nvidia-smi >>"$OUT/gpu_check.log" 2>&1 || true  # (at most 8 files come back from the device machine)

step environment 30 "$PY" - "$OUT/environment.json" <<'EOF'
import json, platform, sys
import numpy, torch
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    env["gpu"] = torch.cuda.get_device_name(0)
    env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
for name in ("onnx", "onnxruntime", "tensorrt", "mediapipe"):
    try:
        env[name] = __import__(name).__version__
    except ImportError:
        env[name] = None
from engines.export import SAVED_RIG, load_saved_rig, reference_rig
try:
    load_saved_rig(SAVED_RIG)
    env["rig_source"] = str(SAVED_RIG)
except Exception as e:  # a decoder change since it was saved: the portrait analysis rebuilds it
    env["rig_source"] = f"rebuilt from the saved portrait ({e})"
reference_rig()  # fails loudly if neither works
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
EOF

BENCH=("$PY" -m avatar.bench engines --out "$OUT" --audio-model "$AUDIO_MODEL")
step bench-torch-cudagraph 45 "${BENCH[@]}" --backend torch --device cuda --frames "$FRAMES"
step bench-torch-eager 45 "${BENCH[@]}" --backend torch --device cuda --no-cuda-graph --frames "$FRAMES"

step pytest-cuda 120 "$PY" -m pytest -m cuda tests/test_gpu.py -v -rs -p no:cacheprovider \
  --junitxml="$OUT/pytest-cuda.xml"

if "$PY" -c "import tensorrt" >/dev/null 2>&1; then
  limit=$(left)
  if [ "$limit" -gt 90 ]; then
    PLANS="$VASA_AVATAR_CACHE/plans"
    step build-engines $(( limit - 60 )) "$PY" build_engines.py --precision fp16 --out "$PLANS" --audio-model "$AUDIO_MODEL"
    cp "$PLANS/manifest.json" "$OUT/tensorrt-manifest.json" 2>/dev/null || true
    step bench-tensorrt 25 "${BENCH[@]}" --backend tensorrt --plan-dir "$PLANS" --frames "$FRAMES"
  else
    echo "TensorRT importable, but only ${limit}s left: not building" | tee -a "$OUT/gpu_check.log"
  fi
else
  echo "TensorRT not importable here: TensorRT build and benchmark skipped" | tee -a "$OUT/gpu_check.log"
fi


# the CPU back-ends on this machine's cores, for comparison with the 2-core development machine
step bench-torch-cpu 30 "${BENCH[@]}" --backend torch --device cpu --threads 4 --frames "$CPU_FRAMES" --label torch-cpu-4t
step bench-onnxruntime-cpu 45 "${BENCH[@]}" --backend onnxruntime --threads 4 --frames "$CPU_FRAMES" --label onnxruntime-cpu-4t

{
  echo "{\"audio_model\": \"$AUDIO_MODEL\", \"total_seconds\": $(( $(date +%s) - START )), \"steps\": ["
  (IFS=,; echo "${STEPS[*]}")
  echo "]}"
} >"$OUT/summary.json"
cat "$OUT/summary.json"
exit $FAILED
