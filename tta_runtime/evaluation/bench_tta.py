"""`tta-runtime bench tta`: the classifier method zoo on the digits corruption suite, and a long continual run.

Protocol (what the JSON says it measured):

* data: the digits test split (`tta_runtime.data.digits`, 539 real images, 32x32), corrupted by the 15
  benchmark corruptions of the suite (CIFAR-10-C's; `BENCHMARK_CORRUPTIONS`) at the chosen severities with
  `corruption_seed` (never the seed recipes were chosen on); error = 1 - accuracy on the corrupted images.
* batch size 1 (our main use): every method episodic, one image at a time, reset after each image.
* batch size 64: the standard online protocol of Tent's paper: batches of 64 in order, the model carries
  its adapted state from batch to batch within one corruption x severity, and is reset between them.
* "none" is the frozen model; the relative reduction of a method is (none - method) / none of the mean
  error over corruptions.
* continual: one stream of `continual_images` images whose corruption changes every `segment` images
  (`corruption_stream`), adapted continually with the runtime's reset policy (`reset_every`,
  plus the method's own collapse signal), against the same method episodic and the frozen model, with
  the error over each window of `window` images. A PNG plot of the error over time is written beside
  the JSON.

Everything goes through the public `Runtime` (`adapt_and_predict` on numpy batches), so the numbers are
what a user of the runtime gets.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tta_runtime.data.digits import (
    BENCHMARK_CORRUPTIONS,
    CORRUPTIONS,
    corrupt,
    corruption_stream,
    load_digits,
)
from tta_runtime.errors import ConfigError
from tta_runtime.evaluation.common import progress_bar
from tta_runtime.files import atomic_write
from tta_runtime.hub import find_model, load_card, load_recipe

log = logging.getLogger(__name__)

SINGLE_IMAGE_METHODS = ("memo",)
DEFAULT_METHODS = ("none", "bn_stats", "tent", "eata", "sar", "memo", "rotation")
CORRUPTION_SEED = 2_026  # the reported corruptions; recipes were chosen on the val split with seed 1
TUNING_SEED = 1


def _runtime(model: str, recipe: str | None, **options: Any) -> Any:
    from tta_runtime.runtime import Runtime

    if recipe is None:
        return Runtime.from_pretrained(model, **options)
    return Runtime.from_pretrained(model, recipe=recipe, **options)


def _labels(results: Sequence[Any]) -> np.ndarray:
    return np.array([r.label for r in results], dtype=np.int64)


def run_method(
    model: str, method: str, images: np.ndarray, *, batch: int, online: bool, overrides: dict[str, Any] | None = None
) -> tuple[np.ndarray, float]:
    """Predicted labels for `images` (N, S, S, 3) uint8 with one method; and seconds per image.

    `online`: one runtime in continual mode over the batches (Tent's protocol); else episodic.
    """
    overrides = dict(overrides or {})
    if method == "none":
        rt = _runtime(model, None)
        t0 = time.perf_counter()
        preds = [_labels(rt.predict(images[i : i + batch])) for i in range(0, len(images), batch)]
    else:
        rt = _runtime(model, method, **({"mode": "continual"} if online else {}))
        t0 = time.perf_counter()
        preds = [_labels(rt.adapt_and_predict(images[i : i + batch], **overrides)) for i in range(0, len(images), batch)]
    seconds = time.perf_counter() - t0
    return np.concatenate(preds), seconds / len(images)


def bench_suite(
    model: str = "digits-cnn-bn", *, methods: Sequence[str] = DEFAULT_METHODS, corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (5,), batch_sizes: Sequence[int] = (1, 64), n_images: int | None = None,
    split: str = "test", seed: int = CORRUPTION_SEED, progress: bool = True, bar: tqdm | None = None,
) -> dict[str, Any]:
    """Error per corruption x severity x method for each batch size (see the module docstring).

    `progress`: one bar over the runs (batch size x method x corruption x severity); `bar`: advance the
    caller's bar instead.
    """
    corruptions = list(corruptions or BENCHMARK_CORRUPTIONS)
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"unknown corruption(s) {unknown}; known: {', '.join(CORRUPTIONS)}")
    images, labels = load_digits(split)
    if n_images is not None:
        images, labels = images[:n_images], labels[:n_images]
    sets = {(c, s): corrupt(images, c, s, seed=seed) for c in corruptions for s in severities}
    out: dict[str, Any] = {}
    total = len(batch_sizes) * len(methods) * len(sets)
    with progress_bar(total, "bench tta", enabled=progress, bar=bar) as runs_bar:
        for bs in batch_sizes:
            out[str(bs)] = _suite_at_batch_size(model, methods, sets, labels, bs, runs_bar)
    return out


def _suite_at_batch_size(
    model: str, methods: Sequence[str], sets: dict[tuple[str, int], np.ndarray], labels: np.ndarray, bs: int, bar: tqdm,
) -> dict[str, Any]:
    """`bench_suite` at one batch size: every method on every corrupted set."""
    per_method: dict[str, Any] = {}
    for method in methods:
        if bs > 1 and method in SINGLE_IMAGE_METHODS:
            per_method[method] = {"skipped": "a single-image method (MEMO adapts on one image's augmentations)"}
            bar.update(len(sets))
            continue
        errors: dict[str, dict[str, float]] = {}
        seconds = []
        for (c, s), x in sets.items():
            pred, sec = run_method(model, method, x, batch=bs, online=bs > 1)
            errors.setdefault(c, {})[str(s)] = float((pred != labels).mean())
            seconds.append(sec)
            bar.set_postfix(bs=bs, method=method)
            bar.update(1)
        mean = float(np.mean([e for per in errors.values() for e in per.values()]))
        per_method[method] = {"errors": errors, "mean_error": mean, "seconds_per_image": float(np.mean(seconds))}
    none = per_method.get("none", {}).get("mean_error")
    for rec in per_method.values():
        if "skipped" in rec:
            continue
        rec["relative_reduction"] = None if not none else (none - rec["mean_error"]) / none
    return {"protocol": "online within each corruption x severity" if bs > 1 else "episodic per image",
            "methods": per_method}


def bench_continual(
    model: str = "digits-cnn-bn", *, method: str = "tent_continual", episodic: Sequence[str] | None = None,
    n_images: int = 10_000, segment: int = 500, window: int = 500, reset_every: int | None = 1_000,
    collapse_window: int | None = 50, severity: int | None = 5, seed: int = CORRUPTION_SEED, progress: bool = True,
    bar: tqdm | None = None,
) -> dict[str, Any]:
    """A continual recipe vs episodic recipes vs the frozen model on one long stream (batch size 1).

    `episodic`: recipes run episodically on the same stream (default: `method` itself, its episodic
    counterpart, and "tent", the batch-1 episodic recipe). The continual runtime uses the reset policy
    `reset_every` + `collapse_window` (+ the method's own signal). `progress`: one bar over the stream's
    images; `bar`: advance the caller's bar instead.
    """
    if window < 1 or n_images < 1:
        raise ConfigError(f"need window >= 1 and n_images >= 1, got window={window}, n_images={n_images}")
    window = min(window, n_images)
    episodic = list(dict.fromkeys(episodic if episodic is not None else [method, "tent"]))
    stream = list(corruption_stream(n_images, segment=segment, severity=severity, seed=seed))
    images = np.stack([s[0] for s in stream])
    labels = np.array([s[1] for s in stream], dtype=np.int64)
    names = [s[2] for s in stream]
    continual = _runtime(model, method, mode="continual", reset_every=reset_every, collapse_window=collapse_window)
    episodic_rts = {f"episodic:{m}": _runtime(model, m, mode="episodic") for m in episodic}
    frozen = _runtime(model, None)
    wrong = {k: np.zeros(n_images, bool) for k in ("continual", *episodic_rts, "none")}
    resets = 0
    with progress_bar(n_images, f"continual {method}", enabled=progress, bar=bar, unit="image") as images_bar:
        images_bar.set_postfix_str(f"continual {method}")
        for i in range(n_images):
            x = images[i]
            rc = continual.adapt_and_predict(x)
            resets += bool(rc.adaptation is not None and rc.adaptation.reset)
            wrong["continual"][i] = rc.label != labels[i]
            for k, rt in episodic_rts.items():
                wrong[k][i] = rt.adapt_and_predict(x).label != labels[i]
            wrong["none"][i] = frozen.predict(x).label != labels[i]
            images_bar.update(1)
    n_win = n_images // window
    curves = {k: [float(v[j * window : (j + 1) * window].mean()) for j in range(n_win)] for k, v in wrong.items()}
    gaps = {
        k: float(max(c - e for c, e in zip(curves["continual"], curves[k]))) for k in episodic_rts
    }
    counterpart = f"episodic:{method}"
    return {
        "method": method, "episodic": episodic, "n_images": n_images, "segment": segment, "window": window,
        "severity": severity, "reset_every": reset_every, "collapse_window": collapse_window, "resets": resets,
        "corruption_order": [names[j * segment] for j in range(0, (n_images + segment - 1) // segment)],
        "error_over_time": curves,
        "mean_error": {k: float(v.mean()) for k, v in wrong.items()},
        "max_window_gap_continual_minus": gaps,
        "max_gap_continual_minus_episodic": gaps[counterpart],
        "within_5_points_everywhere": bool(gaps[counterpart] <= 0.05),
    }


def plot_continual(report: dict[str, Any], path: Path) -> Path:
    """PNG of error (%) per window over the stream for continual, episodic and frozen."""
    from tta_runtime.visual import line_plot, save_png

    curves = {k: [100 * v for v in vals] for k, vals in report["error_over_time"].items()}
    title = f"continual {report['method']} vs episodic: error % per {report['window']} images"
    return save_png(path, line_plot(curves, title=title, x_label=f"window of {report['window']} images"))


def bench_tta(
    json_path: str | Path, *, model: str = "digits-cnn-bn", methods: Sequence[str] = DEFAULT_METHODS,
    corruptions: Sequence[str] | None = None, severities: Sequence[int] = (5,), batch_sizes: Sequence[int] = (1, 64),
    n_images: int | None = None, continual_methods: Sequence[str] = ("tent_continual",), continual_images: int = 10_000,
    reset_every: int | None = 1_000, collapse_window: int | None = 50, command: str = "", progress: bool = True,
) -> dict[str, Any]:
    """Run the suite and the continual runs; write the JSON (and `<json stem>_continual_<method>.png`).

    `progress`: one bar for the whole call (the suite's runs, then the continual streams' images).
    """
    json_path = Path(json_path)
    card = load_card(find_model(model))
    if card.task != "classification":
        raise ConfigError(f"bench tta needs a classifier; {model!r} is a {card.task} model (try digits-cnn-bn)")
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "model": card.name, "weights_sha256": card.weights.sha256, "date": _dt.date.today().isoformat(),
        "command": command, "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "split": "test", "corruption_seed": CORRUPTION_SEED, "severities": list(severities),
        "recipes": {m: _recipe_summary(m) for m in methods if m != "none"},
    }
    n_runs = len(batch_sizes) * len(methods) * len(corruptions or BENCHMARK_CORRUPTIONS) * len(severities)
    with tqdm(total=n_runs + len(continual_methods) * continual_images, desc="bench tta", disable=not progress,
              dynamic_ncols=True) as bar:
        report["batch_sizes"] = {} if not batch_sizes else bench_suite(
            model, methods=methods, corruptions=corruptions, severities=severities, batch_sizes=batch_sizes,
            n_images=n_images, bar=bar,
        )
        report["continual"] = {}
        for m in continual_methods:
            rec = bench_continual(
                model, method=m, n_images=continual_images, reset_every=reset_every, collapse_window=collapse_window,
                bar=bar,
            )
            png = plot_continual(rec, json_path.with_name(f"{json_path.stem}_continual_{m}.png"))
            rec["plot"] = png.name
            report["continual"][m] = rec
    report["seconds"] = time.perf_counter() - t0
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(json_path, (json.dumps(report, indent=2) + "\n").encode(), "JSON report")
    return report


def _recipe_summary(name: str) -> dict[str, Any]:
    r = load_recipe(name)
    return {k: v for k, v in r.model_dump().items() if k not in ("description",)}
