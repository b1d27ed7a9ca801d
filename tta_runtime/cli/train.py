"""`tta-runtime train segmenter | unet | encoder | classifier | ftwt`: every kind of training, one command group.

Each writes a model folder (card.json + weights.safetensors) or, for `ftwt`, a pruned variant inside one;
the card records the command that made it. The loops live in `tta_runtime.training`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tta_runtime.cli.common import (
    busy,
    check_range,
    command_line,
    echo,
    numbers,
    progress,
)


def add_segmenter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="model folder to write (card.json + weights.safetensors)")
    p.add_argument("--name", default="slot-shapes-32")
    p.add_argument("--run-dir", default=None, help="checkpoints and logs (default runs/NAME); re-run to resume")
    p.add_argument("--steps", type=int, default=6_000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--encoder-channels", type=int, default=32, help="conv encoder width, or the U-Net encoder's base width")
    p.add_argument("--encoder", choices=("conv", "unet"), default="conv",
                   help="the paper's stride-1 conv stack, or a 2-level U-Net that sees the whole image")
    p.add_argument("--fourier-bands", type=int, default=5, help="decoder coordinate encodings (paper: 0)")
    p.add_argument("--pixel-fraction", type=float, default=0.25)
    p.add_argument("--mask-weight", type=float, default=1.0)
    p.add_argument("--mask-weight-final", type=float, default=0.1)
    p.add_argument("--attn-weight", type=float, default=0.0, help="matched mask loss on the attention maps too (paper: 0)")
    p.add_argument("--attn-ce-weight", type=float, default=0.0,
                   help="per-pixel cross-entropy over the slots on the attention maps (sharper object edges; paper: 0)")
    p.add_argument("--warmup", type=int, default=500, help="linear lr warm-up steps")
    p.add_argument("--lr-final-fraction", type=float, default=0.1, help="cosine decay to lr x this at the end")
    p.add_argument("--init-from", default=None, help="start from a checkpoint or model folder: a fine-tuning stage")
    p.add_argument("--init-encoder", default=None,
                   help="a pretrained encoder (folder or name, `train encoder`) for the U-Net encoder's body")
    p.add_argument("--data-start", type=int, default=0, help="first training scene index")
    p.add_argument("--val-images", type=int, default=64)
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step (checkpointed; re-run to resume)")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the model trains, e.g. cuda (the batches are the same)")
    p.add_argument("--workers", type=int, default=0, help="processes generating batches ahead (0: in the loop)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop (checkpointed) after this many seconds of this call and write the folder; re-run to resume")
    add_scene_data(p)
    p.set_defaults(func=_segmenter)


def add_scene_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", choices=("shapes", "flat"), default="shapes",
                   help="the generated family to train on: shapes (dark backgrounds, 2-4 objects) or flat (any "
                   "background, 1-6 objects of seven shape families)")
    p.add_argument("--dataset-size", type=int, default=None, help="a fixed set of N scenes, cycled (default: fresh scenes)")
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="share of scenes with segmentation labels (the rest train reconstruction only), e.g. 0.1")


def scene_data(args: argparse.Namespace) -> dict:
    return {
        "train_split": "flat/in_dist" if args.world == "flat" else "in_dist", "dataset_size": args.dataset_size,
        "label_fraction": args.label_fraction,
    }


def _segmenter(args: argparse.Namespace) -> int:
    from tta_runtime.config import SegmenterConfig, validate
    from tta_runtime.training import TrainConfig, train, write_model_folder

    seg = validate(
        SegmenterConfig,
        {
            "resolution": args.resolution, "num_slots": args.slots, "encoder_channels": args.encoder_channels,
            "decoder_fourier_bands": args.fourier_bands, "encoder": args.encoder,
        },
        "train options",
    )
    cfg = validate(
        TrainConfig,
        {
            "name": args.name, "segmenter": seg, "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "seed": args.seed, "pixel_fraction": args.pixel_fraction, "mask_weight": args.mask_weight,
            "mask_weight_final": args.mask_weight_final, "attn_weight": args.attn_weight,
            "attn_ce_weight": args.attn_ce_weight, "eval_every": args.eval_every,
            "ckpt_every": args.ckpt_every, "warmup": args.warmup, "lr_final_fraction": args.lr_final_fraction,
            "val_images": args.val_images, "init_from": args.init_from, "data_start": args.data_start,
            "init_encoder": args.init_encoder,
            **scene_data(args),
        },
        "train options",
    )
    run_dir = Path(args.run_dir or f"runs/{cfg.name}")
    model = train(
        cfg, run_dir, progress=progress(args), stop_at=args.stop_at, device=args.device, workers=args.workers,
        time_limit=args.time_limit,
    )
    out = write_model_folder(model, cfg, Path(args.out), command=command_line(args), run_dir=run_dir)
    echo(args, f"wrote model folder {out}")
    return 0


def add_unet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="models/slot-shapes-32/feedforward", help="baseline folder to write")
    p.add_argument("--run-dir", default="runs/feedforward", help="checkpoints and logs; re-run to resume")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--name", default="unet-shapes-32")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--slots", type=int, default=8, help="mask channels K (the slot model's)")
    add_scene_data(p)
    p.set_defaults(func=_unet)


def _unet(args: argparse.Namespace) -> int:
    from tta_runtime.config import validate
    from tta_runtime.training import (
        FeedForwardTrainConfig,
        save_feedforward,
        train_feedforward,
    )

    from tta_runtime.models.unet import FeedForwardConfig

    model_cfg = validate(FeedForwardConfig, {"resolution": args.resolution, "num_slots": args.slots}, "train unet options")
    cfg = validate(
        FeedForwardTrainConfig,
        {"name": args.name, "steps": args.steps, "model": model_cfg, **scene_data(args)},
        "train unet options",
    )
    model = train_feedforward(cfg, Path(args.run_dir), progress=progress(args))
    save_feedforward(model, cfg, args.out, command=command_line(args), run_dir=args.run_dir)
    echo(args, f"wrote baseline folder {args.out}")
    return 0


def add_encoder(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="encoder folder to write (card.json + weights.safetensors)")
    p.add_argument("--name", default="unet-mim-64")
    p.add_argument("--run-dir", default=None, help="checkpoints and logs (default runs/NAME); re-run to resume")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--base-channels", type=int, default=16, help="the U-Net body's width (a slot model's --encoder-channels)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--world", choices=("shapes", "flat"), default="flat", help="the generated scenes among the images")
    p.add_argument("--photo-fraction", type=float, default=0.5, help="share of each batch that is photo crops")
    p.add_argument("--mask-ratio", type=float, default=0.5, help="share of the patches hidden")
    p.add_argument("--patch", type=int, default=8, help="hidden square side, pixels")
    p.add_argument("--time-limit", type=float, default=None, help="stop (checkpointed) after this many seconds; re-run to resume")
    p.set_defaults(func=_encoder)


def _encoder(args: argparse.Namespace) -> int:
    from tta_runtime.config import validate
    from tta_runtime.models.encoder_folder import EncoderArch
    from tta_runtime.training.pretrain import PretrainConfig, pretrain_encoder, write_encoder_folder

    arch = validate(EncoderArch, {"resolution": args.resolution, "base_channels": args.base_channels, "depth": args.depth},
                    "train encoder options")
    cfg = validate(
        PretrainConfig,
        {"name": args.name, "model": arch, "train_split": "flat/in_dist" if args.world == "flat" else "in_dist",
         "photo_fraction": args.photo_fraction, "mask_ratio": args.mask_ratio, "patch": args.patch, "steps": args.steps,
         "batch": args.batch, "lr": args.lr},
        "train encoder options",
    )
    run_dir = Path(args.run_dir or f"runs/{cfg.name}")
    body = pretrain_encoder(cfg, run_dir, progress=progress(args), time_limit=args.time_limit)
    out = write_encoder_folder(body, cfg, args.out, command=command_line(args), run_dir=run_dir)
    echo(args, f"wrote encoder folder {out}")
    return 0


def add_classifier(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="model folder to write; its name is the model's name")
    p.add_argument("--norm", choices=("batch", "group", "layer"), default="batch")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--widths", default=None, help="channels per stage, e.g. 16,32,64 (default: the shipped digits models')")
    p.set_defaults(func=_classifier)


def _classifier(args: argparse.Namespace) -> int:
    import json

    from tta_runtime.config import ClassifierConfig, validate
    from tta_runtime.training import DEFAULT_CONFIG, train_classifier

    fields = {**DEFAULT_CONFIG.model_dump(), "norm": args.norm}
    if args.widths is not None:
        fields["widths"] = tuple(numbers(args.widths, "--widths", int))
    out = train_classifier(
        validate(ClassifierConfig, fields, "--norm/--widths"), epochs=args.epochs, batch=args.batch, lr=args.lr,
        seed=args.seed, out=Path(args.out), command=command_line(args), progress=progress(args),
    )
    card = json.loads((out / "card.json").read_text())
    clean, shifted = card["metrics"]["clean"], card["metrics"]["corruption_error_severity5"]
    echo(
        args,
        f"wrote {out}: clean test accuracy {clean['test_accuracy']:.4f}, mean severity-5 error "
        f"{shifted['mean_benchmark']:.4f} (15 benchmark corruptions), {card['training']['seconds']:.0f} s training "
        f"({card['training']['cpu_seconds']:.0f} s CPU)",
    )
    return 0


def add_ftwt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits-cnn-bn", help="a shipped CNN classifier with BatchNorm, or its folder")
    p.add_argument("--r", type=float, required=True, help="kept share of activation-peak mass, in (0, 1] (e.g. 0.6)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument(
        "--static-quantile", type=float, default=0.8,
        help="after the predictor phase, fine-tune with a static k per unit (this quantile of the predicted kept counts)",
    )
    p.add_argument("--dynamic", action="store_true", help="no static-k phase: masks stay sigmoid > 0.5 per input")
    p.add_argument("--name", default=None, help="variant folder name under <model>/prune/ (default r<r>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=_ftwt)


def set_threads(n: int) -> None:
    """torch's intra-op threads for a timed or trained run (`--threads`)."""
    import torch

    from tta_runtime.errors import ConfigError

    if n < 1:
        raise ConfigError(f"--threads must be >= 1; got {n}")
    torch.set_num_threads(n)


def _ftwt(args: argparse.Namespace) -> int:
    from tta_runtime.errors import ConfigError
    from tta_runtime.evaluation.bench_prune import prune_train

    if not 0 < args.r <= 1:
        raise ConfigError(f"--r must be in (0, 1] (the kept share of activation-peak mass); got {args.r}")
    check_range(args.static_quantile, "--static-quantile", 0, 1)
    check_range(args.epochs, "--epochs", 1, 10_000)
    set_threads(args.threads)
    with busy(args, "train ftwt"):
        _, info = prune_train(
            args.model, r=args.r, epochs=args.epochs, static_quantile=None if args.dynamic else args.static_quantile,
            seed=args.seed, name=args.name, command=command_line(args),
        )
    m = info["metrics"]
    echo(
        args,
        f"pruned variant {info['name']!r} of {args.model} (masks {info['masks']}, k per unit {info['ks']}): "
        f"test accuracy {m['test_accuracy']:.4f}, conv MACs -{m['test_macs_reduction']:.1%}, "
        f"trained in {info['training']['seconds']:.0f} s",
        f"load it with Runtime.from_pretrained({args.model!r}, prune={info['name']!r})",
    )
    return 0
