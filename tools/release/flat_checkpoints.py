"""Validation FG-ARI of slot-segmenter training checkpoints, by mask source (the decoder's masks, the
slot-attention maps, and their product with attention power 0.5, the shipped model's choice).

    python tools/release/flat_checkpoints.py runs/slot-flat-64-unet/ckpt.safetensors [...] --n 256 --json OUT.json

Scenes: the first `--n` validation scenes (seed 1000) of each checkpoint's training split; a checkpoint is never
scored on test scenes here (model selection happens on these).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tta_runtime.models.segmenter import SlotSegmenter
from tta_runtime.training.checkpoint import load_checkpoint
from tta_runtime.training.slot import TrainConfig, validate_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {}
    for path in args.checkpoints:
        ckpt = load_checkpoint(Path(path))
        cfg = TrainConfig.model_validate_json(ckpt.config)
        row = {"step": ckpt.step, "training_seconds": round(ckpt.elapsed, 1), "train_split": cfg.train_split,
               "encoder": cfg.segmenter.encoder}
        for source in ("decoder", "attention", "product"):
            seg = cfg.segmenter.model_copy(update={"mask_source": source, "attention_power": 0.5})
            model = SlotSegmenter(seg)
            model.load_state_dict(ckpt.model)
            model.eval()
            with torch.no_grad():
                row[f"fg_ari_{source}"] = round(validate_model(model, args.n, cfg.train_split)["fg_ari"], 4)
        print(path, row, flush=True)
        out[path] = row
    report = {"validation_scenes": args.n, "checkpoints": out,
              "command": "python tools/release/flat_checkpoints.py " + " ".join(args.checkpoints) + f" --n {args.n} --json {args.json}"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
