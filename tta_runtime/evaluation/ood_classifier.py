"""OOD scorers for classifiers: calibration on the digits model, and detection of the corruption suite.

Fitting: the classifier's pooled features and logits on the clean digits TRAIN split (class labels for
the class-conditional scorers), the threshold at `tpr` on the clean VAL split (images the scorers did
not see). Evaluation: the clean TEST split as negatives, each corruption of the suite (test split, a
fixed corruption seed) as positives; AUROC / AUPR / FPR@95 per corruption, then the mean per family
(noise, blur, weather, digital) and severity.

Only generic classifier signals are used (`OODFeatures.logits`, `.embedding` = the pooled features, `.stem` =
the first convolution's channel statistics), so the same code calibrates any `task = "classification"` model
given images and labels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tta_runtime.data.digits import CORRUPTIONS, corrupt, load_digits
from tta_runtime.evaluation.ood import detection_metrics
from tta_runtime.frozen import FeaturePass
from tta_runtime.models.classifier import set_norm_mode
from tta_runtime.ood import CLASSIFIER_SCORERS, DEFAULT_TPR, Calibration, OODFeatures
from tta_runtime.ood.fit import fit_calibrations

log = logging.getLogger(__name__)

__all__ = ["classifier_features", "eval_ood_classifier", "fit_ood_classifier"]


def classifier_features(model: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> OODFeatures:
    """Logits, pooled features and first-convolution statistics (numpy float64) of uint8 images (N, S, S, 3),
    source BatchNorm statistics."""
    set_norm_mode(model, "source")
    parts = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float() / 255.0
            parts.append(FeaturePass(model, "classification", "encoder", stem=True)(x.to(next(model.parameters()).device))[1].numpy())
    return OODFeatures.concat(parts)


def fit_ood_classifier(
    model: torch.nn.Module, *, scorers: Iterable[str] = CLASSIFIER_SCORERS, tpr: float = DEFAULT_TPR,
    weights_sha256: str | None = None,
) -> dict[str, Calibration]:
    """Fit every scorer on the digits train split and threshold it on the val split."""
    size = model.cfg.resolution  # type: ignore[attr-defined]
    train_x, train_y = load_digits("train", size)
    val_x, _ = load_digits("val", size)
    return fit_calibrations(
        classifier_features(model, train_x), classifier_features(model, val_x), labels=train_y, scorers=scorers, tpr=tpr,
        split="digits:train (threshold: digits:val)", seed=0, embedding="encoder", weights_sha256=weights_sha256,
    )


def eval_ood_classifier(
    model: torch.nn.Module, calibrations: dict[str, Calibration], *, severities: Sequence[int] = (1, 3, 5),
    corruptions: Sequence[str] | None = None, seed: int = 2_026, progress: bool = False,
) -> dict[str, Any]:
    """AUROC, AUPR, FPR@95 and the flagged fraction per corruption x severity and scorer; family means.

    `progress`: one bar over the corruption x severity pairs.
    """
    size = model.cfg.resolution  # type: ignore[attr-defined]
    test_x, _ = load_digits("test", size)
    base_f = classifier_features(model, test_x)
    base = {n: c.score(base_f) for n, c in calibrations.items()}
    names = list(corruptions or CORRUPTIONS)
    report: dict[str, Any] = {
        "negatives": f"clean digits test split ({len(test_x)} images)", "positives": f"the same images corrupted, seed {seed}",
        "sign": "higher = more out of distribution",
        "in_dist": {n: {"flagged": float(np.mean(calibrations[n].is_ood(s)))} for n, s in base.items()},
        "corruptions": {},
    }
    with tqdm(total=len(names) * len(severities), desc="ood eval", disable=not progress) as bar:
        for c in names:
            bar.set_postfix_str(c)
            for sev in severities:
                f = classifier_features(model, corrupt(test_x, c, sev, seed=seed))
                report["corruptions"].setdefault(c, {})[str(sev)] = {
                    n: detection_metrics(base[n], cal.score(f), cal) for n, cal in calibrations.items()
                }
                bar.update()
    families: dict[str, Any] = {}
    for fam in sorted({CORRUPTIONS[c] for c in names}):
        members = [c for c in names if CORRUPTIONS[c] == fam]
        families[fam] = {
            str(sev): {
                n: round(float(np.mean([report["corruptions"][c][str(sev)][n]["auroc"] for c in members])), 6)
                for n in calibrations
            }
            for sev in severities
        }
        families[fam]["corruptions"] = members
    report["families_mean_auroc"] = families
    return report
