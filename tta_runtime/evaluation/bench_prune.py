"""FTWT pruning of a shipped CNN classifier: train a variant into the model folder, and the pruning benchmark.

`prune_train` (``tta-runtime prune train``) fine-tunes the backbone with FTWT masks and trains the predictors
(``train_ftwt``), then writes ``<model>/prune/<name>/`` so that
``Runtime.from_pretrained(model, prune=name)`` loads it.

`bench_prune` (``tta-runtime bench prune --json PATH``) does that for several r and reports, on the clean test
split, accuracy and theoretical FLOPs per execution path, and batch-1 CPU latency against the dense model,
all measured interleaved in one run. Each r trains three variants from the shipped weights, identical in the
predictor phase (first half of the epochs) and different in how the backbone fine-tunes in the second half:

- ``mask_multiply``: dynamic k (predictor > 0.5) throughout, full convolutions times masks: FTWT itself;
- ``static``: a static k per unit (the top-k channels by predictor logit) in the second half; run by the gather
  path (``GatheredClassifier``, PyTorch) and by the same computation exported to ONNX (TopK + Gather on the
  folded weights) on ONNX Runtime. This is the variant ``prune train`` writes to the model folder;
- ``buckets``: width buckets (``WidthBuckets``) in the second half: each unit's filters ordered by how often the
  predictors keep them, a bucket = the most frequent filters up to a quantile of the predicted kept counts;
  per input, unit 1's predicted kept count picks the smallest bucket that holds it. Run by
  ``BucketedClassifier``: plain narrower convs, no gather at run time, one ONNX graph per bucket;
- the dense baselines: the shipped model (``dense``), the same convs with BatchNorm folded (``dense_folded``)
  and the shipped model exported to ONNX (``ort_dense``).

Latency is the median of interleaved calls (A B C A B C ...) at batch 1 on the threads torch and ONNX Runtime
are given (the CLI pins both to ``--threads``).
"""

from __future__ import annotations

import copy
import io
import logging
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.data.digits import load_digits
from tta_runtime.errors import ConfigError
from tta_runtime.evaluation.timing import interleaved_latency
from tta_runtime.hub import find_model
from tta_runtime.models.classifier import (
    CNNClassifier,
    images_to_tensor,
    load_classifier,
)
from tta_runtime.prune import (
    BucketedClassifier,
    FTWTClassifier,
    GatheredClassifier,
    PrunedClassifier,
    fit_buckets,
    fit_static_ks,
    predictor_macs,
    save_pruned,
    unit_macs,
)
from tta_runtime.training import augment, train_ftwt

log = logging.getLogger(__name__)

DEFAULT_RS = (0.5, 0.6, 0.65, 0.7, 0.8, 0.9)
RECIPE = {
    "epochs": 20, "batch": 64, "lr_backbone": 1e-2, "predictor_optimizer": "adam", "lr_predictor": 1e-2,
    "static_quantile": 0.8, "augment": "the shipped model's training augmentation",
    "note": "decoupled FTWT: predictor BCE weight 1 for the first half of the epochs, then 0 while the backbone "
    "fine-tunes with the static top-k masks (k = the static_quantile of the predicted kept counts on the training "
    "images); unit 0 (the conv reading the image) is never pruned",
}


def _digits_model(model: str) -> tuple[CNNClassifier, Any, Path]:
    folder = find_model(model)
    backbone, card = load_classifier(folder)
    if card.classifier is None or card.classifier.norm != "batch":
        raise ConfigError(
            f"prune train / bench prune need a CNN classifier with BatchNorm (the gather path folds it); {card.name!r} "
            "is not one (try digits-cnn-bn; the slot segmenter's encoder is pruned by train_ftwt_segmenter)"
        )
    return backbone, card, folder


def prune_train(
    model: str = "digits-cnn-bn", *, r: float, epochs: int = 20, static_quantile: float | None = 0.8, seed: int = 0,
    name: str | None = None, save: bool = True, command: str = "",
) -> tuple[PrunedClassifier, dict[str, Any]]:
    """Train an FTWT variant of ``model`` at ``r``, evaluate it on the digits val and test splits and (``save``)
    write it to ``<model>/prune/<name>/`` (default name ``r<r>``). Returns the module and its metrics."""
    backbone, card, folder = _digits_model(model)
    x_tr, y_tr = load_digits("train")
    t0 = time.perf_counter()
    ftwt, tlog = train_ftwt(
        backbone, x_tr, y_tr, r=r, epochs=epochs, augment=augment, predictor_optimizer="adam",
        lr_predictor=1e-2, lr_backbone=1e-2, seed=seed, static_quantile=static_quantile,
    )
    seconds = time.perf_counter() - t0
    masks, ks = ("topk", tlog.static_k) if tlog.static_k is not None else ("predict", None)
    pruned = PrunedClassifier.from_ftwt(ftwt, masks=masks, ks=ks)
    metrics: dict[str, Any] = {}
    for split in ("val", "test"):
        x, y = load_digits(split)
        with torch.inference_mode():
            logits = pruned(images_to_tensor(x)).logits
        metrics[f"{split}_accuracy"] = round(float((logits.argmax(1).numpy() == y).mean()), 4)
        metrics[f"{split}_macs_reduction"] = round(1 - float(pruned.macs_fraction().mean()), 4)
    training = {
        "command": command, "r": r, "epochs": epochs, "static_quantile": static_quantile, "seed": seed,
        "seconds": round(seconds, 1), "data": "tta_runtime.data.digits 'train' split",
        "hardware": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
    }
    if save:
        save_pruned(pruned, folder, name or f"r{r:g}", part="classifier", r=r, masks=masks, ks=ks,
                    training=training, metrics=metrics)
    return pruned, {"name": name or f"r{r:g}", "masks": masks, "ks": ks, "metrics": metrics, "training": training,
                    "ftwt": ftwt, "log": tlog}


# --------------------------------------------------------------------------------------------------
# ONNX Runtime versions of the paths (static shapes, batch 1)


class _GatherGraph(nn.Module):
    """``GatheredClassifier`` as a traceable module: TopK on the predictor logits, Gather on the weights."""

    def __init__(self, g: GatheredClassifier) -> None:
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(t, requires_grad=False) for t in g.weights)
        self.b = nn.ParameterList(nn.Parameter(t, requires_grad=False) for t in g.biases)
        self.pw = nn.ParameterList(nn.Parameter(t, requires_grad=False) for t in g.pred_w[1:])  # type: ignore[arg-type]
        self.pb = nn.ParameterList(nn.Parameter(t, requires_grad=False) for t in g.pred_b[1:])  # type: ignore[arg-type]
        self.hw = nn.Parameter(g.head_w, requires_grad=False)
        self.hb = nn.Parameter(g.head_b, requires_grad=False)
        self.pool, self.ks = g.pool, g.ks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - 0.5) / 0.5
        prev = None
        for u in range(len(self.w)):
            if self.pool[u]:
                h = F.max_pool2d(h, 2)
            w, b = self.w[u], self.b[u]
            if prev is not None:
                w = w.index_select(1, prev)
            idx = None
            if u and self.ks is not None:
                pw = self.pw[u - 1] if prev is None else self.pw[u - 1].index_select(1, prev)
                z = F.linear(h.mean(dim=(2, 3)), pw, self.pb[u - 1])[0]
                idx = z.topk(self.ks[u]).indices
                w, b = w.index_select(0, idx), b.index_select(0, idx)
            h = F.relu(F.conv2d(h, w, b, padding=1))
            prev = idx
        hw = self.hw if prev is None else self.hw.index_select(1, prev)
        return F.linear(h.mean(dim=(2, 3)), hw, self.hb)


class _Logits(nn.Module):
    """A classifier's logits only (ONNX export needs a tensor output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


class _Seq(nn.Module):
    """One bucket (or the stem) as a traceable module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def ort_session(module: nn.Module, example: torch.Tensor, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Export ``module`` (static shapes) and return a function running it on ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on the static shapes this export is meant to have
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"x": a})[0]


# --------------------------------------------------------------------------------------------------
# The benchmark

ADAPT_RECIPES = ("none", "bn_stats", "tent")
ADAPT_SEVERITY = 5
ADAPT_SEED = 2026


def adaptation_errors(
    models: dict[str, nn.Module], card: Any, images: np.ndarray, labels: np.ndarray, *, batch: int = 64,
) -> dict[str, Any]:
    """Mean error (%) over the benchmark corruptions at severity 5 of each model with each recipe of
    ``ADAPT_RECIPES``, through ``Runtime`` (episodic, batches of ``batch``): a pruned model predicts its masks
    on each batch before the adaptation loop and its steps reuse them."""
    from tta_runtime.data.digits import BENCHMARK_CORRUPTIONS, corrupt
    from tta_runtime.hub import load_recipe
    from tta_runtime.runtime import Runtime

    out: dict[str, Any] = {"corruptions": list(BENCHMARK_CORRUPTIONS), "severity": ADAPT_SEVERITY,
                           "seed": ADAPT_SEED, "n_images": int(len(images)), "batch": batch}
    sets = [corrupt(images, c, ADAPT_SEVERITY, seed=ADAPT_SEED) for c in BENCHMARK_CORRUPTIONS]
    for name, model in models.items():
        errs = {}
        for rec in ADAPT_RECIPES:
            rt = Runtime(copy.deepcopy(model), card, recipe=load_recipe("bn_stats" if rec == "none" else rec))
            wrong = 0
            for xs in sets:
                for i in range(0, len(xs), batch):
                    res = (rt.predict if rec == "none" else rt.adapt_and_predict)(xs[i : i + batch])
                    wrong += int(sum(r.label != t for r, t in zip(res, labels[i : i + batch])))
            errs[rec] = round(100 * wrong / (len(sets) * len(images)), 2)
        out[name] = errs
    return out



def _train(model: str, r: float, epochs: int, **kw: Any) -> tuple[FTWTClassifier, Any]:
    """An FTWT variant with prune_train's recipe (for the benchmark's dynamic and bucket variants)."""
    backbone, _, _ = _digits_model(model)
    x_tr, y_tr = load_digits("train")
    return train_ftwt(backbone, x_tr, y_tr, r=r, epochs=epochs, augment=augment, predictor_optimizer="adam",
                      lr_predictor=1e-2, lr_backbone=1e-2, seed=0, **kw)


def bench_prune(
    model: str = "digits-cnn-bn", *, rs: Sequence[float] = DEFAULT_RS, epochs: int = 20,
    static_quantile: float = 0.8, bucket_quantiles: Sequence[float] = (0.5, 0.9), calls: int = 300,
    threads: int = 1, onnx: bool = True, save_variant: float | None = None, adapt_images: int = 128, command: str = "",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The pruning benchmark (module docstring). ``save_variant``: also write the variant trained at that r
    into the model folder. Returns the JSON-ready report."""
    say = progress or (lambda _msg: None)
    x_tr, _ = load_digits("train")
    x_te, y_te = load_digits("test")
    t_te = images_to_tensor(x_te)
    base, card, _ = _digits_model(model)
    with torch.inference_mode():
        base_acc = float((base(t_te).logits.argmax(1).numpy() == y_te).mean())
    units_base = None
    rows = []
    t_start = time.perf_counter()
    for r in rs:
        say(f"r={r:g}: training ({epochs} epochs)")
        pruned, info = prune_train(model, r=r, epochs=epochs, static_quantile=static_quantile, save=save_variant == r,
                                   command=command)
        ftwt: FTWTClassifier = info["ftwt"]
        say(f"r={r:g}: training the dynamic-k and the width-bucket variants")
        dyn_model, _ = _train(model, r, epochs)
        bk_model, bk_log = _train(model, r, epochs, bucket_quantiles=bucket_quantiles)
        units = ftwt.units
        units_base = units
        widths = [u.conv.out_channels for u in units]
        dense_macs = float(unit_macs(units, torch.tensor([widths], dtype=torch.float64)).sum())
        say(f"r={r:g}: accuracy and latency")
        with torch.inference_mode():
            dyn = dyn_model(t_te)
            kept = torch.stack([m.sum(1) for m in dyn.masks], 1)
            macs_dyn = unit_macs(units, kept).sum(1)
            acc_dyn = float((dyn.logits.argmax(1).numpy() == y_te).mean())
            # the static-k phase fixed k; a run too short to reach it (epochs < 2) takes the same quantile now
            ks = info["ks"] or fit_static_ks(ftwt, x_tr, static_quantile)
            st = ftwt(t_te, masks="topk", ks=ks)
            acc_st = float((st.logits.argmax(1).numpy() == y_te).mean())
            macs_st = float(unit_macs(units, torch.tensor([ks], dtype=torch.float64)).sum())
            gather = GatheredClassifier(ftwt, ks)
            folded = GatheredClassifier(ftwt, None)
            wb = bk_log.buckets or fit_buckets(bk_model, x_tr, bucket_quantiles)  # (epochs < 2: fitted now)
            buckets = BucketedClassifier(bk_model, wb)
            bk_masks = bk_model(t_te, masks="buckets", buckets=wb).logits
            bucket_logits = torch.cat([buckets(t_te[i : i + 1]) for i in range(len(t_te))])
            counts = list(buckets.counts)
            acc_b = float((bucket_logits.argmax(1).numpy() == y_te).mean())
            macs_b = sum(c * buckets.macs(i) for i, c in enumerate(counts)) / len(t_te)
            gl = torch.cat([gather(t_te[i : i + 1]) for i in range(64)])
            x1 = t_te[:1].clone()
            fns: dict[str, Callable[[], object]] = {
                "dense": lambda: base(x1), "dense_folded": lambda: folded(x1), "gather": lambda: gather(x1),
                "buckets": lambda: buckets(x1),
            }
            parity: dict[str, float] = {"gather_vs_mask_multiply_topk": float((gl - st.logits[:64]).abs().max()),
                                        "buckets_vs_mask_multiply_buckets": float((bucket_logits - bk_masks).abs().max())}
            if onnx:
                a1 = x1.numpy()
                ort_dense = ort_session(_Logits(base), x1, threads)
                ort_gather = ort_session(_GatherGraph(gather), x1, threads)
                h0 = buckets.stem(x1)
                ort_stem = ort_session(_Seq(buckets.stem), x1, threads)
                ort_b = [ort_session(_Seq(lambda h, i=i: buckets.run_bucket(i, h)), h0, threads)
                         for i in range(len(buckets.widths))]

                def ort_buckets(a: np.ndarray = a1) -> np.ndarray:
                    h = ort_stem(a)
                    return ort_b[buckets.choose(torch.from_numpy(h))](h)

                fns.update({"ort_dense": lambda: ort_dense(a1), "ort_gather": lambda: ort_gather(a1),
                            "ort_buckets": ort_buckets})
                parity["ort_gather_vs_torch_gather"] = max(
                    float(np.abs(ort_gather(t_te[i : i + 1].numpy()) - gl[i : i + 1].numpy()).max()) for i in range(64))
                parity["ort_buckets_vs_torch_buckets"] = max(
                    float(np.abs(ort_buckets(t_te[i : i + 1].numpy()) - bucket_logits[i : i + 1].numpy()).max())
                    for i in range(64))
                parity["ort_dense_vs_torch_dense"] = float(np.abs(ort_dense(a1) - base(x1).logits.numpy()).max())
            buckets.counts = [0] * len(buckets.widths)
            lat = interleaved_latency(fns, calls=calls)
        say(f"r={r:g}: adaptation on corrupted test images")
        adapt = adaptation_errors({"dense": base, "pruned": pruned}, card, x_te[:adapt_images], y_te[:adapt_images])
        ratio = {k: round(v / lat["dense"], 3) for k, v in lat.items()}
        if onnx:
            ratio.update({f"{k}_vs_ort_dense": round(lat[k] / lat["ort_dense"], 3) for k in ("ort_gather", "ort_buckets")})
        rows.append({
            "r": r,
            "train_seconds_static_variant": info["training"]["seconds"],
            "mask_multiply": {
                "accuracy": round(acc_dyn, 4), "accuracy_drop_points": round(100 * (base_acc - acc_dyn), 3),
                "flops_reduction": round(1 - float(macs_dyn.mean()) / dense_macs, 4),
                "flops_reduction_with_predictors": round(
                    1 - float((macs_dyn + predictor_macs(units, kept)).mean()) / dense_macs, 4),
                "mean_kept_fraction_per_unit": [round(float(v), 4) for v in (kept.mean(0) / torch.tensor(widths))],
            },
            "static": {
                "k": ks, "accuracy": round(acc_st, 4), "accuracy_drop_points": round(100 * (base_acc - acc_st), 3),
                "flops_reduction": round(1 - macs_st / dense_macs, 4),
            },
            "buckets": {
                "widths": buckets.widths, "share_of_test_inputs": [round(c / len(t_te), 4) for c in counts],
                "accuracy": round(acc_b, 4), "accuracy_drop_points": round(100 * (base_acc - acc_b), 3),
                "flops_reduction": round(1 - macs_b / dense_macs, 4),
            },
            "with_adaptation": adapt,
            "latency_ms_batch1": {k: round(v * 1e3, 4) for k, v in lat.items()},
            "latency_ratio_vs_dense": ratio,
            "max_abs_logit_diff": parity,
        })
        say(f"r={r:g}: static acc {acc_st:.4f} flops -{rows[-1]['static']['flops_reduction']:.0%}, "
            f"gather/dense {ratio['gather']}, buckets/dense {ratio['buckets']}"
            + (f", ort_gather/dense {ratio['ort_gather']}" if onnx else ""))
    assert units_base is not None
    report = {
        "model": card.name, "baseline_test_accuracy": round(base_acc, 4), "n_test": int(len(y_te)),
        "command": command, "recipe": {**RECIPE, "epochs": epochs, "static_quantile": static_quantile},
        "bucket_quantiles": list(bucket_quantiles), "latency_calls": calls, "threads": threads,
        "hardware": f"{platform.machine()}, {threads} thread(s) (torch and ONNX Runtime), torch {torch.__version__}",
        "seconds": round(time.perf_counter() - t_start, 1),
        "latency_note": "batch 1, median of interleaved calls in this run; 'dense' = the shipped model as it "
        "runs in the runtime (BatchNorm a separate op), 'dense_folded' = BatchNorm folded into the convs, no "
        "pruning: the honest dense baseline for the gather and bucket paths; 'ort_dense' = the shipped model on "
        "ONNX Runtime (which folds BatchNorm itself)",
        "rows": rows,
    }
    report["targets"] = _targets(report)
    return report


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    """Which rows meet #8's acceptance figures (>= 50% FLOPs at <= 1 point; latency ratio <= 0.7)."""
    rows = report["rows"]
    out: dict[str, Any] = {}
    for path in ("mask_multiply", "static", "buckets"):
        hits = [x["r"] for x in rows if x[path]["flops_reduction"] >= 0.5 and x[path]["accuracy_drop_points"] <= 1.0]
        out[f"flops_50pct_at_1pt_drop_{path}"] = {"met": bool(hits), "at_r": hits}
    for path, acc_path in (("gather", "static"), ("buckets", "buckets"), ("ort_gather", "static"), ("ort_buckets", "buckets")):
        if path not in rows[0]["latency_ratio_vs_dense"]:
            continue
        for base in ("ort_dense",) if path.startswith("ort") else ("dense", "dense_folded"):
            hits = [x["r"] for x in rows
                    if x["latency_ms_batch1"][path] / x["latency_ms_batch1"][base] <= 0.7
                    and x[acc_path]["accuracy_drop_points"] <= 1.0]
            out[f"latency_ratio_le_0.7_{path}_vs_{base}_with_le_1pt_drop"] = {"met": bool(hits), "at_r": hits}
    return out


def plot_prune(report: dict[str, Any], path: Path) -> None:
    """Accuracy and FLOPs reduction over r (sorted by FLOPs cut), and the latency ratios."""
    from tta_runtime.visual import line_plot, panel, save_png

    rows = sorted(report["rows"], key=lambda x: x["mask_multiply"]["flops_reduction"])
    base = 100 * report["baseline_test_accuracy"]
    x_label = "r = " + ", ".join(f"{x['r']:g}" for x in rows)
    acc = line_plot({
        "dynamic k": [100 * x["mask_multiply"]["accuracy"] for x in rows],
        "static k": [100 * x["static"]["accuracy"] for x in rows],
        "buckets": [100 * x["buckets"]["accuracy"] for x in rows],
        "shipped - 1pt": [base - 1] * len(rows),
    }, size=(300, 420), title="test accuracy (%)", x_label=x_label)
    cut = line_plot({
        "dynamic k": [100 * x["mask_multiply"]["flops_reduction"] for x in rows],
        "static k": [100 * x["static"]["flops_reduction"] for x in rows],
        "buckets": [100 * x["buckets"]["flops_reduction"] for x in rows],
        "50% target": [50.0] * len(rows),
    }, size=(300, 420), title="FLOPs reduction (%)", x_label=x_label)
    keys = [k for k in ("dense_folded", "gather", "buckets", "ort_dense", "ort_gather", "ort_buckets")
            if k in rows[0]["latency_ratio_vs_dense"]]
    lat = line_plot({**{k: [100 * x["latency_ratio_vs_dense"][k] for x in rows] for k in keys},
                     "70% target": [70.0] * len(rows)},
                    size=(300, 420), title="batch-1 latency / shipped dense (%)", x_label=x_label)
    save_png(path, panel([(f"FTWT {report['model']}: accuracy", acc), ("FLOPs", cut), ("CPU latency", lat)]))
