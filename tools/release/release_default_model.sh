#!/usr/bin/env bash
# Everything after training that the shipped default model carries, in order (about 20 minutes on 2 cores):
# OOD calibration, the evaluation JSON, the OOD evaluation, the gating benchmark and the README picture.
# Before it: tools/release/ship_default_model.py (the folder from the last training stage). Not in it: the
# pruned variant prune/r0.8 (OMP_NUM_THREADS=1 .venv/bin/python tools/release/ftwt_segmenter.py --rs 0.8,
# about 10 minutes) and the streaming figures (STREAM_SKIP_MEMORY=1 tools/release/stream_demo.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
tr=.venv/bin/tta-runtime
m=models/slot-shapes-32
$tr ood fit --model slot-shapes-32
$tr eval --n-images 20 --jobs 2 --baseline entropy --feedforward-recipe none --json $m/eval.json
$tr ood eval --model slot-shapes-32 --n-images 256 --json $m/ood_eval.json
$tr bench gate --model slot-shapes-32 --n-images 32 --json $m/gate_bench.json
$tr demo --out out/demo --no-progress
mkdir -p docs && cp out/demo/overlay.png docs/demo.png
.venv/bin/python tools/release/eval_tables.py $m/eval.json $m/ood_eval.json > out/tables.md
