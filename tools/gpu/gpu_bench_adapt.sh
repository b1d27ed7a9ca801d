#!/usr/bin/env bash
# GPU benchmark of the fast-adaptation levers (issue #9), sized for ONE 10-minute run on an H100 / H200.
#
#   OUT=/some/folder bash tools/gpu/gpu_bench_adapt.sh                       # on the GPU machine
#   DEVICE=cpu SMOKE=1 OUT=out/gpu_smoke bash tools/gpu/gpu_bench_adapt.sh   # CPU smoke test, tiny sizes
#
# Three phases, most important first, each under its own time limit and writing its own JSON under $OUT,
# so a run that is cut short still brings back what finished:
#   1. one image at the paper's size (a randomly initialised 128x128 SlotSegmenter, 11 slots, the paper's
#      widths; time does not depend on the weights): the fast preset with CUDA graphs + bf16 + fused Adam,
#      with the host reading the guard back once at the end ('async', ExecutionConfig.sync_every) and
#      without (a host sync every step, as measured before), and async at batch 32; faithful timed in the
#      same process.                                                                (limit 180 s)
#   2. quality on the shipped 32x32 model, 2 test images per OOD split (seed 2026): FG-ARI gain of the
#      fast preset eager and with graphs + bf16 + fused Adam + async at batch 1 and 4, the faithful recipe
#      as the reference in the same run.                                            (limit 140 s)
#   3. the eager levers at the paper's size (faithful, each lever alone, fast and turbo, vmap batch 1 and
#      8, alone and with bf16 and fused Adam), as measured before.                  (limit 150 s)
# Files under $OUT (the device tool brings back at most 8): env.txt, phases.log (every phase's output) and
# one JSON per phase.
# The first H200 run (2026-11-28, the script as it was then, results and exact commands in
# docs/results/gpu_bench_adapt_h200/) found one image host-bound at 5.75 ms a step: phase 1 measures the fix.
# Each configuration with CUDA graphs compiles for 9-37 s (not in the figures: warmup_seconds).
# Needs: torch with CUDA, numpy, pydantic, safetensors, tqdm, scipy, scikit-image, opencv (the scene
# textures). Python: $PY (default python3), with this repository on PYTHONPATH. Each phase's JSON is
# rewritten after every configuration ("complete": false until the phase ends). The H200 image this
# first ran on had no pydantic: carry it as wheels and put them on PYTHONPATH first.
set -uo pipefail

cd "$(dirname "$0")/../.."
. tools/gpu/env_check.sh
gpu_defaults out/gpu_bench_adapt
COMPILE_BACKEND=${COMPILE_BACKEND:-inductor}
BENCH=("$PY" -m tta_runtime.cli bench adapt --device "$DEVICE" --extra-recipes slot_tta_turbo --no-progress)

if [ "$SMOKE" = 1 ]; then  # tiny sizes, to check the plumbing on a CPU (inductor compiles slowly there)
  SIZE=16; SLOTS=3; TIMING_IMAGES=1; N_IMAGES=1; SPLITS=unseen_colours,more_objects; LIMIT1=900; LIMIT2=900; LIMIT3=600
else
  SIZE=128; SLOTS=11; TIMING_IMAGES=4; N_IMAGES=2; SPLITS=textured_objects,textured_background,unseen_colours,noise_blur,more_objects,unseen_shapes
  LIMIT1=180; LIMIT2=140; LIMIT3=150
fi

check_env
LOGS=${TMPDIR:-/tmp}/gpu_bench_adapt_logs
mkdir -p "$LOGS"

status=0
run_phase() {  # name, limit in seconds, bench arguments...
  local name=$1 limit=$2; shift 2
  echo "== phase $name (limit ${limit}s): ${BENCH[*]} $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "${BENCH[@]}" "$@" --json "$OUT/$name.json" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "   rc $rc after $((SECONDS - t0)) s"
  { echo "== phase $name (limit ${limit}s, rc $rc after $((SECONDS - t0)) s): ${BENCH[*]} $*"; cat "$LOGS/$name.log"; } >> "$OUT/phases.log"
  tail -n 40 "$LOGS/$name.log"
  [ $rc -eq 0 ] || status=1
}

PAPER=(--timing-size "$SIZE" --timing-slots "$SLOTS" --timing-images "$TIMING_IMAGES" --compile-backend "$COMPILE_BACKEND")

# 1. one image (and batch 32) at the paper's size, graphs + bf16 + fused Adam, host syncs once at the end;
#    and the same one image with a host sync every step (the first H200 run's best: 0.356 s)
run_phase single_128 "$LIMIT1" --no-quality --no-levers "${PAPER[@]}" --batch-sizes 1,32 \
  --exec-levers graphs,bf16,fused,async \
  --configs fast:batched1+graphs+bf16+fused+async,fast:batched1+graphs+bf16+fused,fast:batched32+graphs+bf16+fused+async

# 2. quality of those settings on the shipped 32x32 model
run_phase quality_32 "$LIMIT2" --no-levers --splits "$SPLITS" --n-images "$N_IMAGES" --batch-sizes 1,4 \
  --exec-levers graphs,bf16,fused,async --compile-backend "$COMPILE_BACKEND" \
  --configs fast,fast:batched1+graphs+bf16+fused+async,fast:batched4+graphs+bf16+fused+async

# 3. eager levers and batching at the paper's size
run_phase timing_128 "$LIMIT3" --no-quality "${PAPER[@]}" --batch-sizes 1,8 --exec-levers bf16,fused

echo "results in $OUT:"; ls -l "$OUT"
exit $status
