#!/usr/bin/env bash
# Train the paper-sized slot segmenter (Slot-TTA's 2D model: 128x128 input, 11 slots, 64-channel conv
# encoder) on the flat world on ONE H100 / H200 within 10 minutes, and write a model folder (issue #18,
# item 6). Nothing on the CPU path depends on it: the shipped models are trained on the CPU.
#
#   OUT=/some/folder bash tools/gpu/train_paper_size.sh          # on the GPU machine (device tool: OUT=$OUT)
#   DEVICE=cpu SMOKE=1 OUT=out/gpu_smoke bash tools/gpu/train_paper_size.sh   # CPU smoke test, tiny sizes
#
# What it runs: `tta-runtime train segmenter --world flat --device cuda --workers N --time-limit T` (batches are
# generated ahead by N CPU processes and are the same as on the CPU: they depend on the step alone), then
# writes $OUT/slot-flat-128/ (card.json, weights.safetensors, adam_state.safetensors, train_log.jsonl) and
# $OUT/heldout.json (FG-ARI on 64 validation scenes of flat/in_dist and each held-out variation). The
# checkpoint ($OUT/run/ckpt.safetensors) lets a later run resume: run the script again with the same OUT.
# Files under $OUT that come back through the device tool: env.txt, train.log, heldout.json and the model
# folder's four files (8 at most). Needs: torch with CUDA, numpy, pydantic, safetensors, tqdm, scipy,
# scikit-image, opencv (the photo splits). Python: $PY (default python3), this repository on PYTHONPATH.
set -uo pipefail

cd "$(dirname "$0")/../.."
. tools/gpu/env_check.sh
gpu_defaults out/train_paper_size

if [ "$SMOKE" = 1 ]; then
  SIZE=32; SLOTS=8; CH=16; BATCH=4; STEPS=6; LIMIT=60; WORKERS=1; VAL=8
else
  # 8,000 steps of 64 scenes if the GPU keeps up; the time limit stops (and checkpoints) first otherwise
  SIZE=128; SLOTS=11; CH=64; BATCH=64; STEPS=${STEPS:-8000}; LIMIT=${LIMIT:-480}
  WORKERS=${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))}; VAL=64
fi

check_env

# TF32 matmuls on Ampere and newer: the float32 model, tensor-core speed
export TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1
set -x
timeout --signal=INT --kill-after=30 $((LIMIT + 120)) "$PY" -m tta_runtime.cli -q train segmenter \
  --out "$OUT/slot-flat-$SIZE" --name "slot-flat-$SIZE" --run-dir "$OUT/run" --world flat \
  --resolution "$SIZE" --slots "$SLOTS" --encoder-channels "$CH" --fourier-bands 5 \
  --steps "$STEPS" --batch "$BATCH" --lr 4e-4 --warmup 500 --lr-final-fraction 0.05 \
  --mask-weight 1 --mask-weight-final 1 --attn-weight 1 --pixel-fraction 0.25 \
  --val-images "$VAL" --eval-every 500 --ckpt-every 250 \
  --device "$DEVICE" --workers "$WORKERS" --time-limit "$LIMIT" --no-progress > "$OUT/train.log" 2>&1
rc=$?
set +x
tail -n 20 "$OUT/train.log"
[ $rc -eq 0 ] || { echo "training failed (rc $rc): $OUT/train.log" >&2; exit $rc; }

"$PY" - "$OUT/slot-flat-$SIZE" "$DEVICE" "$VAL" > "$OUT/heldout.json" <<'PYEOF'
import json, sys
import torch
from tta_runtime.data.flat_world import HELD_OUT_SPLITS
from tta_runtime.hub import load_card, load_weights
from tta_runtime.models.segmenter import SlotSegmenter
from tta_runtime.training.slot import validate_model
folder, device, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
card = load_card(folder)
model = SlotSegmenter(card.segmenter)
model.load_state_dict(load_weights(folder, card))
model.to(device).eval()
with torch.no_grad():
    out = {s: validate_model(model, n, s) for s in ("flat/in_dist", *HELD_OUT_SPLITS)}
print(json.dumps({"model": card.name, "validation_seed_scenes": n, "splits": out}, indent=2))
PYEOF
cat "$OUT/heldout.json"
