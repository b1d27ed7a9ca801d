"""What `Runtime.predict` and `Runtime.adapt_and_predict` return."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tta_runtime.adapt.loop import AdaptationReport


def _empty(*shape: int, dtype: type = np.float32) -> Any:
    return field(default_factory=lambda: np.zeros(shape, dtype), repr=False)


@dataclass
class Result:
    """One image's prediction. Segmenters fill the mask fields, classifiers the class fields.

    Segmentation (at the input image's own resolution (H, W)):
    - `masks`: (K, H, W) float32 in [0, 1], summing to 1 over K (one soft mask per slot)
    - `segmentation`: (H, W) int64 slot ids (argmax of `masks`)
    - `reconstruction`: (H, W, 3) float32 in [0, 1], the model's rendering of the image
    - `recon_mse`: mean squared error of `reconstruction` (after adaptation, if any) on the resized input

    Classification:
    - `logits`: (C,) float32; `probs`: (C,) float32 softmax, summing to 1; `label`: int, the argmax;
      `label_name`: the card's name for it ("" when the card has no labels)

    Both:
    - `ood_score`: how far the input is from the training data, before adaptation (higher = further).
      With a calibration in the model folder: the calibrated scorer (`ood_scorer`) and `is_ood` (score
      above the threshold fitted at 95% in-distribution TPR); without one: a segmenter reports the
      reconstruction error as a z-score against the card's statistics, a classifier the energy score
      (-logsumexp of the logits), and `is_ood` is None. Always computed with the loaded weights (after
      continual adaptation too), so the same input always gets the same score
    - `adaptation`: what the adaptation did (None for `predict`); for a batch, every image's Result shares
      the one report of the batch's adaptation
    - `pruning`: with `prune=` (a pruned variant), the frozen forward's channel decisions for this input:
      `variant`, `kept_fraction` per unit, `macs_fraction` (multiply-accumulates of the pruned part, predictors
      included, over its dense cost: a classifier's convs, a segmenter's encoder); None otherwise
    """

    masks: np.ndarray = _empty(0, 0, 0)
    segmentation: np.ndarray = _empty(0, 0, dtype=np.int64)
    reconstruction: np.ndarray | None = None
    ood_score: float = float("nan")
    ood_scorer: str = ""
    recon_mse: float = float("nan")
    is_ood: bool | None = None  # score above the calibrated threshold; None when the model has no calibration
    logits: np.ndarray = _empty(0)
    probs: np.ndarray = _empty(0)
    label: int = -1
    label_name: str = ""
    task: str = "segmentation"
    image: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 3), np.uint8), repr=False)  # input, for overlays
    model: str = ""
    device: str = "cpu"
    backend: str = "torch"
    adaptation: AdaptationReport | None = None
    timings: dict[str, float] = field(default_factory=dict)
    pruning: dict[str, Any] | None = None  # pruned models: variant, kept_fraction per unit, macs_fraction

    @property
    def num_slots(self) -> int:
        return int(self.masks.shape[0])

    def overlay(self, alpha: float = 0.5, outlines: bool = True) -> np.ndarray:
        """(H, W, 3) uint8 RGB: the input with each slot's region tinted and outlined."""
        from tta_runtime.visual import overlay_masks

        return overlay_masks(self.image, self.masks, alpha=alpha, outlines=outlines)

    def save(self, path: str | os.PathLike[str], *, overlay: bool = True) -> dict[str, Path]:
        """Write this result to disk; return the files written by kind ("labels", "overlay", "json").

        `path` gives the stem S of the files: an existing folder (or a path ending in "/") means
        `folder/result`; a path ending in ".json" is the JSON file, the PNGs go beside it; any other path is
        S itself (an image extension such as ".png" is refused: the result is several files). A segmenter
        writes `S.labels.png` (the (H, W) slot ids as a lossless single-channel uint8 PNG; ids above 255
        are refused), `S.overlay.png` (`overlay()`, unless `overlay=False`) and `S.json`; a classifier
        writes `S.json` only. The JSON is `to_dict()` (a classifier's with `logits` and `probs`) plus
        "files", the PNGs' names beside it; NaN is written as null. Existing regular files are replaced;
        a folder, device, FIFO or link in the way raises `ConfigError` before anything is written.
        """
        from tta_runtime.result_io import save_result

        return save_result(self, path, overlay=overlay)

    def to_dict(self, arrays: bool = False) -> dict[str, Any]:
        """JSON-ready summary; `arrays=True` adds the masks and segmentation (or logits) as nested lists."""
        out: dict[str, Any] = {
            "model": self.model,
            "task": self.task,
            "device": self.device,
            "backend": self.backend,
            "ood_score": self.ood_score,
            "ood_scorer": self.ood_scorer,
            "is_ood": self.is_ood,
            "timings": dict(self.timings),
            "adaptation": None if self.adaptation is None else self.adaptation.to_dict(),
        }
        if self.pruning is not None:
            out["pruning"] = dict(self.pruning)
        if self.task == "classification":
            out.update({"label": self.label, "label_name": self.label_name, "confidence": float(self.probs[self.label])})
            if arrays:
                out["logits"] = self.logits.tolist()
                out["probs"] = self.probs.tolist()
            return out
        out.update({
            "image_size": list(self.segmentation.shape),
            "num_slots": self.num_slots,
            "slots_used": int(len(np.unique(self.segmentation))),
            "recon_mse": self.recon_mse,
        })
        if arrays:
            out["masks"] = self.masks.tolist()
            out["segmentation"] = self.segmentation.tolist()
        return out
