"""Write a model folder (card, weights, Adam moments) from a flat-world slot training checkpoint, for evaluating a
run before anything ships.

    python tools/release/flat_model_folder.py runs/slot-flat-64-unet/snapshots/step3400.safetensors OUT \
        [--mask-source attention] [--recipe slot_tta_fast]

The masks default to the slot-attention maps: on the flat world they lead the decoder's masks by far
(docs/flat_world.md). The card's validation figures are re-measured on 256 validation scenes (seed 1000).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tta_runtime.models.segmenter import SlotSegmenter
from tta_runtime.training import TrainConfig, write_model_folder
from tta_runtime.training.checkpoint import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--mask-source", default="attention", choices=("decoder", "attention", "product"))
    ap.add_argument("--recipe", default="slot_tta_fast", help="the card's default recipe")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(Path(args.checkpoint))
    cfg = TrainConfig.model_validate_json(ckpt.config)
    seg = cfg.segmenter.model_copy(update={"mask_source": args.mask_source})
    cfg = cfg.model_copy(update={"segmenter": seg})
    model = SlotSegmenter(seg)
    model.load_state_dict(ckpt.model)
    out = Path(args.out)
    write_model_folder(model.eval(), cfg, out, command=f"python tools/release/flat_model_folder.py {args.checkpoint} OUT "
                       f"--mask-source {args.mask_source} --recipe {args.recipe} (checkpoint step {ckpt.step})")
    card = json.loads((out / "card.json").read_text())
    card["default_recipe"] = args.recipe
    card["training"]["steps_done"] = ckpt.step
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {out}: step {ckpt.step}, validation {card['metrics']['val_in_dist_256']}")


if __name__ == "__main__":
    main()
