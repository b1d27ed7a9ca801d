"""Which OOD scorer a classifier should report: far shifts (natural photos) and near shifts (corruptions) together.

    negatives: the clean digits test split (539 images)
    far:       scikit-image's astronaut, coffee, chelsea and rocket photos, whole and cropped (24 images)
    near:      the digits test split under each corruption of the suite (severity 5, seed 2026)

Every image goes through the runtime's own door (`prepare_image` with the card's preprocessing) and frozen
pass, so the numbers are what `Runtime.predict` reports. Per scorer: AUROC far, mean AUROC near, and the
share of each set over the calibrated threshold.

    python tools/release/ood_photo_table.py --model digits-cnn-bn --model digits-cnn-gn [--json out.json]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tta_runtime.data.digits import BENCHMARK_CORRUPTIONS, corrupt, load_digits
from tta_runtime.frozen import FeaturePass
from tta_runtime.inputs import prepare_image
from tta_runtime.models.classifier import set_norm_mode
from tta_runtime.ood import Calibration, OODFeatures, auroc

__all__ = ["PHOTOS", "natural_photos", "photo_table", "scorer_report"]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
NEAR_SEED = 2_026


def natural_photos() -> list[np.ndarray]:
    """24 uint8 RGB photos: each of `PHOTOS` whole, its four quadrants and its centre half (bundled with
    scikit-image: nothing downloads)."""
    import skimage.data

    out = []
    for name in PHOTOS:
        img = np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])
        h, w = img.shape[:2]
        out.append(img)
        out += [img[: h // 2, : w // 2], img[: h // 2, w // 2 :], img[h // 2 :, : w // 2], img[h // 2 :, w // 2 :]]
        out.append(img[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2])
    return [np.ascontiguousarray(x) for x in out]


def _features(rt: Any, images: Sequence[np.ndarray]) -> OODFeatures:
    """Logits, embeddings and first-convolution statistics of `images` through the runtime's preprocessing and frozen pass (source statistics)."""
    set_norm_mode(rt.model, "source")
    parts = []
    with torch.inference_mode():
        for i in range(0, len(images), 64):
            x = torch.cat([prepare_image(im, preprocessing=rt.card.preprocessing).tensor for im in images[i : i + 64]])
            parts.append(FeaturePass(rt.model, "classification", "encoder", stem=True)(x.to(rt.device))[1].numpy())
    return OODFeatures.concat(parts)


def scorer_report(rt: Any, calibrations: Mapping[str, Calibration], *, corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS,
                  severity: int = 5, split: str = "test") -> dict[str, Any]:
    """Per scorer: AUROC photos-vs-clean ("far"), mean AUROC corruptions-vs-clean ("near"), their mean, and the
    shares flagged (over the calibrated threshold) of clean digits, photos and corrupted digits. `split`: the
    digits split of the clean and corrupted sets ("val" to choose a scorer, "test" to report it)."""
    test_x, _ = load_digits(split, rt.input_size)
    clean = _features(rt, list(test_x))
    photos = _features(rt, natural_photos())
    near = {c: _features(rt, list(corrupt(test_x, c, severity, seed=NEAR_SEED))) for c in corruptions}
    out: dict[str, Any] = {}
    for name, cal in calibrations.items():
        s0, sp = cal.score(clean), cal.score(photos)
        near_auc = {c: auroc(s0, cal.score(f)) for c, f in near.items()}
        far = auroc(s0, sp)
        mean_near = float(np.mean(list(near_auc.values())))
        out[name] = {
            "auroc_far": round(far, 4), "auroc_near": round(mean_near, 4), "auroc_mean": round((far + mean_near) / 2, 4),
            "flagged_clean": round(float(np.mean(cal.is_ood(s0))), 4), "flagged_photos": round(float(np.mean(cal.is_ood(sp))), 4),
            "flagged_near": round(float(np.mean([np.mean(cal.is_ood(cal.score(f))) for f in near.values()])), 4),
        }
    return {"model": rt.name, "split": split, "n_clean": len(clean), "n_photos": len(photos), "corruptions": list(corruptions),
            "severity": severity, "scorers": out}


def photo_table(reports: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows: one per scorer, AUROC far / near per model, and the mean over models."""
    names = list(reports[0]["scorers"])
    head = "| scorer | " + " | ".join(f"{r['model']} far / near / flagged clean, photos" for r in reports) + " | mean AUROC |"
    rows = [head, "|" + "---|" * (len(reports) + 2)]
    for n in names:
        cells = [f"{r['scorers'][n]['auroc_far']:.3f} / {r['scorers'][n]['auroc_near']:.3f} / "
                 f"{r['scorers'][n]['flagged_clean']:.1%}, {r['scorers'][n]['flagged_photos']:.0%}" for r in reports]
        mean = float(np.mean([r["scorers"][n]["auroc_mean"] for r in reports]))
        rows.append(f"| {n} | " + " | ".join(cells) + f" | {mean:.3f} |")
    return rows

