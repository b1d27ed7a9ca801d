"""Write a model folder from a training checkpoint, to evaluate a candidate before it replaces a shipped model.

    .venv/bin/python scripts/candidate_folder.py runs/slot-shapes-32-s3/ckpt.pt out/cand3-dec
    .venv/bin/python scripts/candidate_folder.py runs/slot-shapes-32-s3/ckpt.pt out/cand3-attn --mask-source attention

then e.g. `tta-runtime eval --model out/cand3-dec --recipe slot_tta_fast --baseline none --n-images 12`.
The folder gets the card, the weights and the in-distribution OOD statistics (`write_model_folder`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tta_runtime.models.segmenter import SlotSegmenter
from tta_runtime.training.slot import TrainConfig, write_model_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a tta-runtime train checkpoint (ckpt.pt)")
    p.add_argument("out", type=Path, help="model folder to write")
    p.add_argument("--mask-source", choices=("decoder", "attention", "product"), default="decoder")
    p.add_argument("--attention-power", type=float, default=1.0, help="with --mask-source product [1]")
    args = p.parse_args()
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    cfg = TrainConfig.model_validate_json(ckpt["config"])
    model = SlotSegmenter(cfg.segmenter)
    model.load_state_dict(ckpt["model"])
    out = write_model_folder(model.eval(), cfg, args.out, command=f"scripts/candidate_folder.py {args.checkpoint} (step {ckpt['step']})",
                             run_dir=args.checkpoint.parent)
    card = json.loads((out / "card.json").read_text())
    card["name"], card["segmenter"]["mask_source"] = out.name, args.mask_source
    card["segmenter"]["attention_power"] = args.attention_power
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {out} (step {ckpt['step']}, mask_source {args.mask_source})")


if __name__ == "__main__":
    main()
