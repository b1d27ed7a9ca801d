"""Picture of a pretrained encoder's pretext task: validation images, what the encoder saw (hidden patches grey),
and what it painted back into the hidden patches, plus the masked error next to two trivial fills.

    python tools/release/mim_sheet.py models/unet-mim-64 docs/img/mim.png [--json docs/results/flat/mim_baselines.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from tta_runtime.data.scenes import VAL_SEED  # noqa: E402
from tta_runtime.models.encoder_folder import load_encoder  # noqa: E402
from tta_runtime.training.pretrain import PretrainConfig, masked_mse, mim_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("encoder")
    ap.add_argument("out")
    ap.add_argument("--json", default=None, help="also write the masked errors here")
    ap.add_argument("--n", type=int, default=8, help="images in the picture")
    args = ap.parse_args()
    torch.set_num_threads(1)
    card, body = load_encoder(args.encoder)
    cfg = PretrainConfig.model_validate(card.training["config"])
    images, hidden = mim_batch(cfg, 0, VAL_SEED, cfg.val_images)  # the card's validation draw
    seen = images * (1 - hidden) + 0.5 * hidden
    with torch.no_grad():
        # The loss covers hidden pixels only, so the output elsewhere means nothing: show the visible pixels as seen.
        painted = images * (1 - hidden) + body(seen).clamp(0, 1) * hidden
        n_hidden = 3 * hidden.sum()
        # Trivial fills for scale: mid-grey, and each image's mean visible colour.
        visible_mean = (images * (1 - hidden)).sum((2, 3), keepdim=True) / (1 - hidden).sum((2, 3), keepdim=True)
        errors = {
            "encoder": float(masked_mse(body, images, hidden)),
            "grey_fill": float(((0.5 - images) ** 2 * hidden).sum() / n_hidden),
            "mean_visible_colour_fill": float(((visible_mean - images) ** 2 * hidden).sum() / n_hidden),
        }
    # Half the batch are scenes, half photo crops: show some of each.
    half = cfg.val_images - round(cfg.val_images * cfg.photo_fraction)
    pick = [*range(args.n // 2), *range(half, half + args.n - args.n // 2)]
    fig, axes = plt.subplots(3, len(pick), figsize=(1.5 * len(pick), 4.8))
    for col, i in enumerate(pick):
        for row, (title, batch) in enumerate((("image", images), ("seen", seen), ("painted", painted))):
            ax = axes[row, col]
            ax.imshow(batch[i].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(title)
    fig.suptitle(f"{card.name}: hidden-pixel MSE {errors['encoder']:.4f} (grey fill {errors['grey_fill']:.4f}, "
                 f"mean visible colour {errors['mean_visible_colour_fill']:.4f})", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(errors)
    if args.json:
        report = {"encoder": args.encoder, "validation_images": cfg.val_images, "seed": VAL_SEED, "masked_mse": errors,
                  "command": f"python tools/release/mim_sheet.py {args.encoder} {args.out} --json {args.json}"}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
