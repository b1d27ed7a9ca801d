#!/usr/bin/env bash
# Train and write the two shipped digits classifiers (models/digits-cnn-bn, models/digits-cnn-gn): same data,
# recipe and seed, BatchNorm vs GroupNorm. About 2-3 minutes (BN) and 4-5 minutes (GN) on one CPU thread;
# with one thread the weights are bit-for-bit repeatable. Each folder gets card.json (provenance, clean and
# severity-5 corruption metrics), weights.safetensors, fisher.safetensors (EATA) and train_log.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
tr=.venv/bin/tta-runtime
$tr train classifier --norm batch --out models/digits-cnn-bn --epochs 30 --seed 0 --no-progress
$tr train classifier --norm group --out models/digits-cnn-gn --epochs 30 --seed 0 --no-progress
# OOD calibration (train split fit, val split threshold) and its evaluation on the corruption suite.
for m in digits-cnn-bn digits-cnn-gn; do
  $tr ood fit --model "$m"
  $tr ood eval --model "$m" --json "models/$m/ood_eval.json"
done
