"""`Runtime.calibrate`: fit every OOD scorer (and EATA's Fisher) on the user's in-distribution images.

    images -> the runtime's own preprocessing (the card's) -> frozen pass, source statistics, in chunks
      -> logits + embeddings; labels given, or the model's predictions (pseudo-labels)
      -> a seeded split: scorers fitted on (1 - holdout) of the images, thresholded at `tpr` on the rest
      -> EATA's diagonal Fisher of the norm-layer affine parameters on the fit images (labels or pseudo-labels)

Library code never prints: `progress(done, total, stage)` is called after every chunk (the CLI shows one bar).
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tta_runtime.adapt.fisher import fisher_information
from tta_runtime.config import ModelCard, ModelScope
from tta_runtime.options import RuntimeOptions
from tta_runtime.errors import ConfigError, InvalidInputError
from tta_runtime.frozen import FeaturePass
from tta_runtime.models.classifier import norm_parameters, set_norm_mode
from tta_runtime.ood import CLASSIFIER_SCORERS, DEFAULT_CLASSIFIER_SCORER, DEFAULT_SCORER, Calibration, OODFeatures
from tta_runtime.ood.scorers import FALLBACK_CLASSIFIER_SCORER, STEM_SCORER
from tta_runtime.ood import load_calibration
from tta_runtime.ood.fit import fit_calibrations, holdout_split
from tta_runtime.prune import PRUNE_DIR
from tta_runtime.registry import unknown_name_message

__all__ = ["CHUNK", "CalibrationReport", "calibrate_classifier", "folder_calibrations"]

CHUNK = 32  # images per forward pass
MAX_FISHER_IMAGES = 1000  # one backward pass each: enough for a stable diagonal, bounded work
Progress = Callable[[int, int, str], None]


@dataclass
class CalibrationReport:
    """What `Runtime.calibrate` fitted: every scorer's `Calibration`, the one `is_ood` now uses, the Fisher (or why not)."""

    calibrations: dict[str, Calibration]
    default: str
    n_fit: int
    n_threshold: int
    labels: str  # "given" or "pseudo (the model's predictions)"
    fisher: dict[str, torch.Tensor] | None = None
    fisher_images: int = 0
    fisher_skipped: str | None = None
    seconds: float = 0.0
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": self.default, "n_fit": self.n_fit, "n_threshold": self.n_threshold, "labels": self.labels,
            "thresholds": {n: c.threshold for n, c in self.calibrations.items()}, "tpr": self.calibrations[self.default].tpr,
            "fisher": None if self.fisher is None else {"images": self.fisher_images, "parameters": sorted(self.fisher)},
            "fisher_skipped": self.fisher_skipped, "seconds": round(self.seconds, 3),
        }


def _labels(labels: Any, n: int, num_classes: int) -> np.ndarray | None:
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise InvalidInputError(f"labels must be {n} integers (one class index per image), got {arr.dtype} array of shape {arr.shape}")
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        raise InvalidInputError(f"labels must be class indices in 0..{num_classes - 1}, got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


def calibrate_classifier(
    model: torch.nn.Module, card: ModelCard, prepare: Callable[[Sequence[Any]], torch.Tensor], items: Sequence[Any],
    labels: Any = None, *, device: torch.device, default: str, tpr: float = 0.99, holdout: float = 0.2,
    scorers: Sequence[str] | None = None, fisher: bool = True, seed: int = 0, progress: Progress | None = None,
) -> CalibrationReport:
    """Fit the classifier's OOD scorers (and Fisher) on `items` (images in any form `prepare` takes).

    `prepare(chunk)` -> (B, 3, S, S) in [0, 1] (the runtime's preprocessing); `default`: the scorer `is_ood`
    reports (must be among `scorers`; None: the classifier default, or its fallback for a model without a convolution). The model must hold its loaded weights (the runtime checks)."""
    if card.task != "classification":
        raise ConfigError("calibrate() fits classifier scorers; a slot segmenter is calibrated with `tta-runtime ood fit`")
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress must be a callable progress(done, total, stage) or None, got {type(progress).__name__}")
    if not 0 < tpr < 1:
        raise ConfigError(f"tpr must be in (0, 1) (the share of in-distribution images kept below the threshold), got {tpr!r}")
    t0 = time.perf_counter()
    n = len(items)
    num_classes = int(getattr(model, "num_classes", 0) or len(card.labels))
    given = _labels(labels, n, num_classes) if num_classes else _labels(labels, n, 1 << 30)
    fit_idx, hold_idx = holdout_split(n, holdout, seed)
    names = list(scorers or CLASSIFIER_SCORERS)
    if default is not None and default not in names:
        raise ConfigError(f"the default scorer {default!r} must be among the fitted scorers {names}")
    n_fisher = min(len(fit_idx), MAX_FISHER_IMAGES) if fisher else 0
    total = n + n_fisher
    set_norm_mode(model, "source")
    parts = []
    with torch.inference_mode():
        for start in range(0, n, CHUNK):
            _, feats = FeaturePass(model, "classification", "encoder", stem=True)(prepare(items[start : start + CHUNK]).to(device))
            parts.append(feats.numpy())
            if progress is not None:
                progress(min(start + CHUNK, n), total, "features")
    feats = OODFeatures.concat(parts)
    if not all(np.isfinite(v).all() for v in (feats.logits, feats.embedding, feats.stem) if v is not None):
        raise ConfigError("the model gives non-finite logits or features on these images; calibration needs finite ones")
    if feats.stem is None:  # no convolution ran: the scorer that reads the first one's statistics cannot run
        if scorers is not None and STEM_SCORER in scorers or default == STEM_SCORER:
            raise ConfigError(f"OOD scorer {STEM_SCORER!r} reads the model's first nn.Conv2d, and this model has none "
                              f"(or its forward pass does not call it): choose others of {list(CLASSIFIER_SCORERS)}")
        names = [n for n in names if n != STEM_SCORER]
    default = default or (DEFAULT_CLASSIFIER_SCORER if DEFAULT_CLASSIFIER_SCORER in names else FALLBACK_CLASSIFIER_SCORER)
    if default not in names:
        raise ConfigError(f"the default scorer {default!r} must be among the fitted scorers {names}")
    y = given if given is not None else feats.logits.argmax(axis=1)
    source = "given" if given is not None else "pseudo (the model's predictions)"

    def subset(idx: np.ndarray) -> OODFeatures:
        return OODFeatures(logits=feats.logits[idx], embedding=feats.embedding[idx],
                           stem=None if feats.stem is None else feats.stem[idx])

    cals = fit_calibrations(
        subset(fit_idx), subset(hold_idx), labels=y[fit_idx], scorers=names, tpr=tpr, seed=seed, embedding="encoder",
        split=f"calibrate(): {len(fit_idx)} images, labels {source}; threshold on {len(hold_idx)} held out",
    )
    report = CalibrationReport(cals, default, len(fit_idx), len(hold_idx), source)
    if fisher and not norm_parameters(model):
        report.fisher_skipped = "the model has no norm layer with affine parameters"
    elif fisher:
        chosen = fit_idx[:n_fisher]

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for start in range(0, len(chosen), CHUNK):
                idx = chosen[start : start + CHUNK]
                yield prepare([items[i] for i in idx]).to(device), torch.from_numpy(y[idx])

        def step(done: int) -> None:
            if progress is not None:
                progress(n + done, total, "fisher")

        report.fisher = fisher_information(model, batches(), progress=step)
        report.fisher_images = len(chosen)
    else:
        report.fisher_skipped = "fisher=False"
    report.seconds = time.perf_counter() - t0
    return report


def folder_calibrations(
    folder: Path | None, options: RuntimeOptions, task: str, scope: ModelScope | None = None
) -> tuple[dict[str, Calibration], Calibration | None]:
    """Every calibration in `<model folder>/ood/` (a pruned variant's own folder with `options.prune`), and the one
    `is_ood` uses: `options.ood_scorer`, else the card's `scope.far_ood_scorer` (the scorer its author validated the
    far-OOD level on), else the task's default scorer (`ConfigError` for an unknown name)."""
    if not options.load_calibration:
        return {}, None
    if folder is not None and options.prune is not None:
        folder = folder / PRUNE_DIR / options.prune  # a pruned model's scores need their own calibration
    if folder is None or not (folder / "ood").is_dir():
        if options.adapt == "when_ood" or options.ood_scorer is not None:
            load_calibration(folder or Path("."))  # raises, saying how to fit one
        return {}, None
    cals = load_calibration(folder)
    defaults = (DEFAULT_CLASSIFIER_SCORER, FALLBACK_CLASSIFIER_SCORER) if task == "classification" else (DEFAULT_SCORER,)
    if scope is not None and scope.far_ood_scorer is not None:
        defaults = (scope.far_ood_scorer, *defaults)
    name = options.ood_scorer or next((d for d in defaults if d in cals), sorted(cals)[0])
    if name not in cals:
        raise ConfigError(unknown_name_message("calibrated OOD scorer", name, list(cals)))
    return cals, cals[name]
