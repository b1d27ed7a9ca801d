#!/usr/bin/env bash
# GPU benchmark of the fast-adaptation levers (issue #9), sized for ONE 10-minute run on an H100 / H200.
#
#   OUT=/some/folder bash scripts/gpu_bench_adapt.sh                       # on the GPU machine
#   DEVICE=cpu SMOKE=1 OUT=out/gpu_smoke bash scripts/gpu_bench_adapt.sh   # CPU smoke test, tiny sizes
#
# Three phases, most important first, each under its own time limit and writing its own JSON under $OUT,
# so a run that is cut short still brings back what finished:
#   1. timing at the paper's size: a randomly initialised 128x128 SlotSegmenter, 11 slots, the paper's
#      widths (time does not depend on the weights); faithful, each lever alone, the fast and turbo
#      presets, the batched vmap path at batch 1 and 8, alone and with bf16 autocast and fused Adam.
#      Eager, no compilation.                                                  (limit 200 s; took 97 s)
#   2. quality on the shipped 32x32 model, 2 test images per OOD split (seed 2026): FG-ARI gain of the
#      fast and turbo presets and of the fast preset with CUDA graphs + bf16 + fused Adam at batch 1 and 4,
#      the faithful recipe as the reference in the same run. (The one-lever-at-a-time quality is in
#      docs/bench_adapt_cpu.json.)                                             (limit 170 s)
#   3. the compiled step at 128x128: torch.compile and CUDA graphs ('reduce-overhead') at batch 8, and
#      CUDA graphs + bf16 + fused Adam at batch 1, 8 and 32; compile time is in warmup_seconds.
#                                                                              (limit 200 s)
# Ran on an H200 on 2026-11-28 (phases 2 and 3 then had other configurations; the results and the exact
# commands are in docs/gpu_bench_adapt_h200/). Each configuration with CUDA graphs compiles for 9-37 s.
# Needs: torch with CUDA, numpy, pydantic, safetensors, tqdm, scipy, scikit-image, opencv (the scene
# textures). Python: $PY (default python3), with this repository on PYTHONPATH. Each phase's JSON is
# rewritten after every configuration ("complete": false until the phase ends). The lent H200's image has
# no pydantic: carry it as wheels (see /work/.library/device/README.md) and put them on PYTHONPATH first.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_bench_adapt}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
COMPILE_BACKEND=${COMPILE_BACKEND:-inductor}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BENCH=("$PY" -m tta_runtime.cli bench adapt --device "$DEVICE" --extra-recipes slot_tta_turbo --no-progress)

if [ "$SMOKE" = 1 ]; then  # tiny sizes, to check the plumbing on a CPU (inductor compiles slowly there)
  SIZE=16; SLOTS=3; TIMING_IMAGES=1; N_IMAGES=1; SPLITS=unseen_colours,more_objects; LIMIT1=300; LIMIT2=300; LIMIT3=900
else
  SIZE=128; SLOTS=11; TIMING_IMAGES=4; N_IMAGES=2; SPLITS=textured_objects,textured_background,unseen_colours,noise_blur,more_objects,unseen_shapes
  LIMIT1=200; LIMIT2=170; LIMIT3=200
fi

{
  date -u +%FT%TZ
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for mod in ("numpy", "pydantic", "safetensors", "tqdm", "scipy", "skimage", "cv2"):
    try:
        __import__(mod)
    except ImportError as e:
        print("MISSING", mod, e)
EOF
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
run_phase() {  # name, limit in seconds, bench arguments...
  local name=$1 limit=$2; shift 2
  echo "== phase $name (limit ${limit}s): ${BENCH[*]} $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "${BENCH[@]}" "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc $rc after $((SECONDS - t0)) s; log $OUT/$name.log"
  tail -n 40 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}

# 1. paper-size timing, eager levers and batching
run_phase timing_128 "$LIMIT1" --no-quality --timing-size "$SIZE" --timing-slots "$SLOTS" --timing-images "$TIMING_IMAGES" \
  --batch-sizes 1,8 --exec-levers bf16,fused

# 2. quality of the fast presets, eager and with CUDA graphs + bf16 + fused Adam, on the shipped 32x32 model
run_phase quality_32 "$LIMIT2" --no-levers --splits "$SPLITS" --n-images "$N_IMAGES" --batch-sizes 1,4 \
  --exec-levers graphs,bf16,fused,compile \
  --configs fast,slot_tta_turbo,fast:batched1+graphs+bf16+fused,fast:batched4+graphs+bf16+fused

# 3. the compiled step at the paper's size: one image, batch 8 and batch 32
run_phase compiled_128 "$LIMIT3" --no-quality --no-levers --timing-size "$SIZE" --timing-slots "$SLOTS" \
  --timing-images "$TIMING_IMAGES" --batch-sizes 1,8,32 --exec-levers graphs,bf16,fused,compile --compile-backend "$COMPILE_BACKEND" \
  --configs fast:batched8+compile,fast:batched8+graphs,fast:batched1+graphs+bf16+fused,fast:batched8+graphs+bf16+fused,fast:batched32+graphs+bf16+fused

echo "results in $OUT:"; ls -l "$OUT"
exit $status
