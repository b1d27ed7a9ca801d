"""Classifier OOD scorers: calibrate the shipped digits model, detect corruptions, gate on the score."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import tta_runtime
from tta_runtime.data.digits import corrupt, load_digits
from tta_runtime.evaluation.ood_classifier import (
    eval_ood_classifier,
    fit_ood_classifier,
)
from tta_runtime.hub import find_model
from tta_runtime.ood import CLASSIFIER_SCORERS, load_calibration, save_calibration


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "digits-cnn-bn"
    shutil.copytree(find_model("digits-cnn-bn"), folder)
    shutil.rmtree(folder / "ood", ignore_errors=True)
    rt = tta_runtime.Runtime.from_pretrained(folder, load_calibration=False)
    cals = fit_ood_classifier(rt.model, weights_sha256=rt.card.weights.sha256)
    save_calibration(folder, cals)
    return folder, cals


def test_every_classifier_scorer_is_fitted_and_thresholded_at_95_percent_tpr(calibrated):
    folder, cals = calibrated
    assert set(cals) == set(CLASSIFIER_SCORERS)
    rt = tta_runtime.Runtime.from_pretrained(folder, load_calibration=False)
    from tta_runtime.evaluation.ood_classifier import classifier_features

    val, _ = load_digits("val")
    feats = classifier_features(rt.model, val)
    for name, cal in cals.items():
        flagged = float(np.mean(cal.score(feats) > cal.threshold))
        assert flagged <= 0.06, name  # about 5 % of in-distribution inputs are over the threshold
    assert set(load_calibration(folder)) == set(CLASSIFIER_SCORERS)


def test_eval_reports_auroc_per_corruption_family_for_every_scorer(calibrated):
    folder, cals = calibrated
    rt = tta_runtime.Runtime.from_pretrained(folder)
    report = eval_ood_classifier(rt.model, cals, severities=(5,), corruptions=["gaussian_noise", "fog", "pixelate", "motion_blur"])
    fams = report["families_mean_auroc"]
    assert set(fams) == {"noise", "weather", "digital", "blur"}
    for fam in fams.values():
        assert set(fam["5"]) == set(CLASSIFIER_SCORERS)
        assert all(0.0 <= v <= 1.0 for v in fam["5"].values())
    assert fams["weather"]["5"]["mahalanobis"] > 0.9  # fog is far from clean digits in feature space


def test_calibrated_classifier_runtime_flags_and_gates(calibrated):
    folder, _ = calibrated
    rt = tta_runtime.Runtime.from_pretrained(folder, recipe="tent", adapt="when_ood", ood_scorer="mahalanobis")
    clean, _ = load_digits("test")
    foggy = corrupt(clean[:8], "fog", 5, seed=3)
    res = rt.adapt_and_predict(np.concatenate([clean[:8], foggy]))
    flags = [r.is_ood for r in res]
    assert all(r.ood_scorer == "mahalanobis" for r in res)
    assert sum(flags[8:]) >= 6 and sum(flags[:8]) <= 2
    for r in res:  # in-distribution images took the predict path, and their report says so
        assert (r.adaptation.skipped is None) == bool(r.is_ood)


def test_continual_classifier_scores_inputs_with_the_loaded_weights(calibrated):
    """tent_continual moves the norm layers and their running statistics; scores stay those of the input."""
    folder, _ = calibrated
    rt = tta_runtime.Runtime.from_pretrained(folder, recipe="tent_continual", ood_scorer="mahalanobis")
    clean, _ = load_digits("test")
    probe = clean[:4]
    before = [r.ood_score for r in rt.predict(probe)]
    foggy = corrupt(clean[8:40], "fog", 5, seed=3)
    for i in range(0, 32, 8):
        rt.adapt_and_predict(foggy[i : i + 8])
    after = rt.predict(probe)
    np.testing.assert_allclose([r.ood_score for r in after], before, rtol=1e-6)
