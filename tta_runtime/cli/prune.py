"""`tta-runtime prune train` and `tta-runtime bench prune`: the command-line doors to `tta_runtime.bench_prune`
(printing lives here)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from tta_runtime.errors import ConfigError


def _floats(s: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, e.g. 0.6,0.7; got {s!r}") from None


def _threads(n: int) -> None:
    import torch

    if n < 1:
        raise ConfigError(f"--threads must be >= 1; got {n}")
    torch.set_num_threads(n)


def _cmd_prune_train(args: Any) -> int:
    from tta_runtime.evaluation.bench_prune import prune_train

    if not 0 < args.r <= 1:
        raise ConfigError(f"--r must be in (0, 1] (the kept share of activation-peak mass); got {args.r}")
    _threads(args.threads)
    static_q = None if args.dynamic else args.static_quantile
    pruned, info = prune_train(
        args.model, r=args.r, epochs=args.epochs, static_quantile=static_q, seed=args.seed, name=args.name,
        command="tta-runtime " + shlex.join(args.argv),
    )
    m = info["metrics"]
    print(f"pruned variant {info['name']!r} of {args.model} (masks {info['masks']}, k per unit {info['ks']}): "
          f"test accuracy {m['test_accuracy']:.4f}, conv MACs -{m['test_macs_reduction']:.1%}, "
          f"trained in {info['training']['seconds']:.0f} s")
    print(f"load it with Runtime.from_pretrained({args.model!r}, prune={info['name']!r})")
    return 0


def _cmd_bench_prune(args: Any) -> int:
    from tta_runtime.evaluation.bench_prune import bench_prune, plot_prune

    _threads(args.threads)
    report = bench_prune(
        args.model, rs=_floats(args.rs, "--rs"), epochs=args.epochs, static_quantile=args.static_quantile,
        bucket_quantiles=_floats(args.bucket_quantiles, "--bucket-quantiles"), calls=args.calls,
        threads=args.threads, onnx=not args.no_onnx, save_variant=args.save_variant, adapt_images=args.adapt_images,
        command="tta-runtime " + shlex.join(args.argv), progress=print if args.progress else None,
    )
    print(f"{report['model']}: shipped test accuracy {report['baseline_test_accuracy']:.4f} ({report['n_test']} images)")
    print(f"{'r':>5} {'path':14}{'acc':>8}{'drop':>7}{'FLOPs-':>8}  latency vs shipped dense (batch 1)")
    for row in report["rows"]:
        lat = row["latency_ratio_vs_dense"]
        for path, lat_keys in (("mask_multiply", []), ("static", ["gather", "ort_gather"]), ("buckets", ["buckets", "ort_buckets"])):
            x = row[path]
            lat_s = ", ".join(f"{k} {lat[k]:.2f}x" for k in lat_keys if k in lat)
            print(f"{row['r']:>5g} {path:14}{x['accuracy']:>8.4f}{x['accuracy_drop_points']:>+7.2f}"
                  f"{x['flops_reduction']:>8.1%}  {lat_s}")
        ad = row["with_adaptation"]
        print(f"{'':>5} corrupted error % (none/bn_stats/tent): dense {'/'.join(str(v) for v in ad['dense'].values())}, "
              f"pruned {'/'.join(str(v) for v in ad['pruned'].values())}")
        print(f"{'':>5} {'dense':14}  folded {lat['dense_folded']:.2f}x" + (f", ort_dense {lat['ort_dense']:.2f}x" if "ort_dense" in lat else ""))
    for k, v in report["targets"].items():
        print(f"{k}: {'MET' if v['met'] else 'not met'} {v['at_r'] if v['met'] else ''}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        plot_prune(report, path.with_suffix(".png"))
        print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def add_cli(commands: Any, bench_commands: Any) -> None:
    """Add `prune train` and `bench prune` (see cli.py's `_CLI_MODULES`)."""
    p = commands.add_parser("prune", help="FTWT dynamic channel pruning: train a pruned variant into the model folder")
    psub = p.add_subparsers(dest="prune_command", required=True)
    t = psub.add_parser("train", help="train FTWT mask predictors (and fine-tune the backbone) for one r")
    t.add_argument("--model", default="digits-cnn-bn", help="a shipped CNN classifier with BatchNorm, or its folder")
    t.add_argument("--r", type=float, required=True, help="kept share of activation-peak mass, in (0, 1] (e.g. 0.6)")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--static-quantile", type=float, default=0.8,
                   help="after the predictor phase, fine-tune with a static k per unit (this quantile of the predicted kept counts)")
    t.add_argument("--dynamic", action="store_true", help="no static-k phase: masks stay sigmoid > 0.5 per input")
    t.add_argument("--name", default=None, help="variant folder name under <model>/prune/ (default r<r>)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.set_defaults(func=_cmd_prune_train)

    b = bench_commands.add_parser("prune", help="FTWT pruning per r: accuracy, FLOPs, batch-1 CPU latency of each path")
    b.add_argument("--model", default="digits-cnn-bn")
    b.add_argument("--rs", default="0.5,0.6,0.65,0.7,0.8,0.9", help="comma-separated r values")
    b.add_argument("--epochs", type=int, default=20)
    b.add_argument("--static-quantile", type=float, default=0.8)
    b.add_argument("--bucket-quantiles", default="0.5,0.9", help="width buckets at these quantiles (plus full width)")
    b.add_argument("--calls", type=int, default=300, help="interleaved latency calls per path")
    b.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    b.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime paths")
    b.add_argument("--adapt-images", type=int, default=128, help="test images per corruption for the adaptation check")
    b.add_argument("--save-variant", type=float, default=None, help="also write the variant trained at this r to the model folder")
    b.add_argument("--json", default=None, help="write the report here (and the plot beside it, .png)")
    b.add_argument("--no-progress", dest="progress", action="store_false")
    b.set_defaults(func=_cmd_bench_prune)
