"""Tests of tta_runtime.ood: each scorer against an independent numpy/scipy recomputation of its published
definition, torch == numpy, detection metrics against sklearn, RankMe, calibration files and errors, and an
end-to-end check on the shipped model.

The reference computations below deliberately use other routes than the module (scipy's cdist, softmax,
logsumexp, entropy, explicit inverses, SVD instead of an eigendecomposition) and never call its helpers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.special
import scipy.stats
import torch
from scipy.spatial.distance import cdist
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from tta_runtime import ood
from tta_runtime.config import SegmenterConfig
from tta_runtime.data.scenes import TEST_SEED, VAL_SEED
from tta_runtime.errors import (
    ConfigError,
    InvalidInputError,
    ModelLoadError,
    TTARuntimeError,
    UnknownNameError,
)
from tta_runtime.evaluation import ood as ood_eval
from tta_runtime.models.segmenter import SegmenterOutput, SlotSegmenter
from tta_runtime.models.segmenter import images_to_tensor as to_tensor
from tta_runtime.ood import OODFeatures
from tta_runtime.registry import Registry

TOL = 1e-5
N_FIT, N_TEST, D, C = 200, 24, 8, 5


# ----------------------------------------------------------------------------------------------------
# Fixed fixtures


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    """Fixed random arrays: a 5-class Gaussian mixture in 8-D with a linear head, plus per-image stats."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2.0, size=(C, D))
    labels = np.arange(N_FIT) % C
    emb_fit = centres[labels] + rng.normal(size=(N_FIT, D)) @ np.diag(np.linspace(0.5, 1.5, D))
    emb_test = np.concatenate([rng.normal(0, 2.0, size=(N_TEST // 2, D)), centres[rng.integers(0, C, N_TEST // 2)]])
    weight, bias = rng.normal(size=(C, D)), rng.normal(size=C)
    return {
        "labels": labels, "emb_fit": emb_fit, "emb_test": emb_test, "weight": weight, "bias": bias,
        "logits_fit": emb_fit @ weight.T + bias, "logits_test": 3 * rng.normal(size=(N_TEST, C)),
        "recon_fit": rng.gamma(2.0, 0.01, N_FIT), "recon_test": rng.gamma(2.0, 0.02, N_TEST),
        "ent_fit": rng.uniform(0.2, 1.0, N_FIT), "ent_test": rng.uniform(0.0, 2.0, N_TEST),
        "dis_fit": rng.gamma(2.0, 0.05, N_FIT), "dis_test": rng.gamma(2.0, 0.1, N_TEST),
        # first-convolution statistics: correlated channel means and spreads, shifted for half the test inputs
        "stem_fit": rng.normal(size=(N_FIT, 6)) @ rng.normal(size=(6, 6)),
        "stem_test": rng.normal(size=(N_TEST, 6)) @ rng.normal(size=(6, 6)) + np.repeat([[0.0], [3.0]], N_TEST // 2, axis=0),
    }


def _feats(fx: dict[str, np.ndarray], part: str) -> OODFeatures:
    return OODFeatures(
        recon_mse=fx[f"recon_{part}"], mask_entropy=fx[f"ent_{part}"], embedding=fx[f"emb_{part}"],
        logits=fx[f"logits_{part}"], mask_disagreement=fx[f"dis_{part}"], stem=fx[f"stem_{part}"],
    )


@pytest.fixture(scope="module")
def fit_feats(fx: dict[str, np.ndarray]) -> OODFeatures:
    return _feats(fx, "fit")


@pytest.fixture(scope="module")
def test_feats(fx: dict[str, np.ndarray]) -> OODFeatures:
    return _feats(fx, "test")


def _fitted(name: str, fit_feats: OODFeatures, fx: dict[str, np.ndarray], **params: object) -> ood.OODScorer:
    scorer = ood.make_scorer(name, **params)
    scorer.fit(fit_feats, fx["labels"] if scorer.needs_labels else None)
    return scorer


# ----------------------------------------------------------------------------------------------------
# Each scorer against its published definition


@pytest.mark.parametrize(("name", "key"), [("recon_error", "recon"), ("mask_entropy", "ent"), ("mask_disagreement", "dis")])
def test_zscored_scorers_match_reference(name: str, key: str, fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    ref = scipy.stats.zmap(fx[f"{key}_test"], fx[f"{key}_fit"])  # (x - mean) / std, ddof 0
    np.testing.assert_allclose(_fitted(name, fit_feats, fx).score(test_feats), ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("k", [1, 50, 10_000])
def test_knn_matches_reference(k: int, fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    bank = fx["emb_fit"] / np.linalg.norm(fx["emb_fit"], axis=1, keepdims=True)
    q = fx["emb_test"] / np.linalg.norm(fx["emb_test"], axis=1, keepdims=True)
    ref = np.sort(cdist(q, bank), axis=1)[:, min(k, N_FIT) - 1]  # k clipped to the bank size
    np.testing.assert_allclose(_fitted("knn", fit_feats, fx, k=k).score(test_feats), ref, rtol=0, atol=TOL)


def _ref_squared_mahalanobis(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    vi = np.linalg.inv(cov)
    return np.array([scipy.spatial.distance.mahalanobis(row, mean, vi) ** 2 for row in x])


def test_mahalanobis_class_agnostic_matches_reference(fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    cov = np.cov(fx["emb_fit"], rowvar=False, bias=True)
    ref = _ref_squared_mahalanobis(fx["emb_test"], fx["emb_fit"].mean(0), cov)
    np.testing.assert_allclose(_fitted("mahalanobis", fit_feats, fx).score(test_feats), ref, rtol=TOL, atol=TOL)


def test_stem_mahalanobis_is_one_gaussian_on_the_stem_statistics(fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    """Class labels are ignored: the first convolution's statistics describe the image, not its class. Each
    statistic is standardised and the correlation matrix gets the ridge (1e-2) on its diagonal."""
    fit, test = fx["stem_fit"], fx["stem_test"]
    corr = np.corrcoef(fit, rowvar=False)
    ref = _ref_squared_mahalanobis(test / fit.std(0), fit.mean(0) / fit.std(0), corr + 1e-2 * np.eye(len(corr)))
    scorer = ood.make_scorer("stem_mahalanobis")
    assert scorer.params() == {"ridge": 1e-2}
    scorer.fit(fit_feats, fx["labels"])
    np.testing.assert_allclose(scorer.score(test_feats), ref, rtol=TOL, atol=TOL)
    with pytest.raises(ConfigError, match="stem"):
        scorer.score(OODFeatures(embedding=fx["emb_test"], logits=fx["logits_test"]))


def _tied_covariance(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Lee et al.: Sigma = 1/N sum_c sum_{i in c} (x_i - mu_c)(x_i - mu_c)^T."""
    return sum(np.cov(x[labels == c], rowvar=False, bias=True) * np.sum(labels == c) for c in np.unique(labels)) / len(x)


def test_mahalanobis_class_conditional_matches_reference(fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    x, labels = fx["emb_fit"], fx["labels"]
    cov = _tied_covariance(x, labels)
    ref = np.min([_ref_squared_mahalanobis(fx["emb_test"], x[labels == c].mean(0), cov) for c in range(C)], axis=0)
    scorer = ood.make_scorer("mahalanobis")
    scorer.fit(fit_feats, labels)
    np.testing.assert_allclose(scorer.score(test_feats), ref, rtol=TOL, atol=TOL)


def test_rmd_matches_reference(fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    x, labels, t = fx["emb_fit"], fx["labels"], fx["emb_test"]
    cov = _tied_covariance(x, labels)
    md_k = np.min([_ref_squared_mahalanobis(t, x[labels == c].mean(0), cov) for c in range(C)], axis=0)
    md_0 = _ref_squared_mahalanobis(t, x.mean(0), np.cov(x, rowvar=False, bias=True))
    np.testing.assert_allclose(_fitted("rmd", fit_feats, fx).score(test_feats), md_k - md_0, rtol=TOL, atol=TOL)


def test_logit_scorers_match_reference(fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    z = fx["logits_test"]
    p = scipy.special.softmax(z, axis=1)
    refs = {
        "msp": -p.max(axis=1),
        "max_logit": -z.max(axis=1),
        "energy": -scipy.special.logsumexp(z, axis=1),
        "softmax_entropy": scipy.stats.entropy(p, axis=1),
    }
    for name, ref in refs.items():
        np.testing.assert_allclose(_fitted(name, fit_feats, fx).score(test_feats), ref, rtol=0, atol=TOL, err_msg=name)
    t = 2.5
    ref_t = -t * scipy.special.logsumexp(z / t, axis=1)
    np.testing.assert_allclose(_fitted("energy", fit_feats, fx, temperature=t).score(test_feats), ref_t, rtol=0, atol=TOL)


def _ref_vim(fx: dict, origin: np.ndarray, dim: int) -> np.ndarray:
    """Wang et al. 2022 from their code's recipe, with the principal subspace from an SVD instead of eigh."""
    xc = fx["emb_fit"] - origin
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    principal = vt[:dim].T  # (D, dim): top right singular vectors = top eigenvectors of xc^T xc / N
    def residual(x: np.ndarray) -> np.ndarray:
        r = (x - origin) - (x - origin) @ principal @ principal.T
        return np.sqrt((r**2).sum(axis=1))
    alpha = fx["logits_fit"].max(axis=1).mean() / residual(fx["emb_fit"]).mean()
    return alpha * residual(fx["emb_test"]) - scipy.special.logsumexp(fx["logits_test"], axis=1)


def test_vim_matches_reference(fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    scorer = ood.make_scorer("vim")  # dim = D // 2 = 4 for D < 768, as in the paper's code
    scorer.fit(fit_feats, weight=fx["weight"], bias=fx["bias"])
    origin = -np.linalg.pinv(fx["weight"]) @ fx["bias"]
    np.testing.assert_allclose(scorer.score(test_feats), _ref_vim(fx, origin, D // 2), rtol=TOL, atol=TOL)
    # without the classifier's head, the origin is the in-distribution mean
    scorer = _fitted("vim", fit_feats, fx, dim=3)
    np.testing.assert_allclose(scorer.score(test_feats), _ref_vim(fx, fx["emb_fit"].mean(0), 3), rtol=TOL, atol=TOL)


def test_vim_dim_follows_the_paper() -> None:
    assert [ood.vim_dim(d) for d in (64, 512, 768, 1024, 2048)] == [32, 256, 512, 512, 1000]


# ----------------------------------------------------------------------------------------------------
# torch == numpy, determinism, sign


@pytest.mark.parametrize("name", sorted(ood.SCORERS.names()))
def test_torch_score_matches_numpy(name: str, fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    scorer = _fitted(name, fit_feats, fx)
    ref = scorer.score(test_feats)
    t64 = scorer.torch_score(test_feats.torch(torch.float64))
    assert t64.dtype == torch.float64 and t64.shape == (N_TEST,)
    np.testing.assert_allclose(t64.numpy(), ref, rtol=1e-10, atol=1e-10)
    t32 = scorer.torch_score(test_feats.torch(torch.float32))
    assert t32.dtype == torch.float32
    np.testing.assert_allclose(t32.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_scores_are_deterministic(fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    for name in ood.SCORERS.names():
        a, b = _fitted(name, fit_feats, fx), _fitted(name, fit_feats, fx)
        np.testing.assert_array_equal(a.score(test_feats), b.score(test_feats), err_msg=name)
        np.testing.assert_array_equal(a.score(test_feats), a.score(test_feats), err_msg=name)


def test_sign_is_higher_is_more_ood(fit_feats: OODFeatures, fx: dict) -> None:
    """Far-away embeddings and flat logits score higher than in-distribution ones, for every scorer."""
    far = OODFeatures(
        recon_mse=np.full(4, 1.0), mask_entropy=np.full(4, 5.0), embedding=fx["emb_fit"][:4] * 0 + 50.0 * np.eye(D)[:4],
        logits=np.zeros((4, C)), mask_disagreement=np.full(4, 3.0), stem=fx["stem_fit"][:4] * 0 + 50.0 * np.eye(6)[:4],
    )
    near = _feats(fx, "fit")
    for name in ood.SCORERS.names():
        s = _fitted(name, fit_feats, fx)
        assert s.score(far).mean() > np.median(s.score(near)), name


# ----------------------------------------------------------------------------------------------------
# Detection metrics against sklearn


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_in, n_ood = rng.integers(5, 200, size=2)
    a, b = rng.normal(size=n_in), rng.normal(0.7, 1.0, size=n_ood)
    if seed % 2:  # coarse rounding makes many ties, within and across the two sets
        a, b = np.round(a, 1), np.round(b, 1)
    y = np.r_[np.zeros(n_in), np.ones(n_ood)]
    s = np.r_[a, b]
    assert ood.auroc(a, b) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert ood.aupr(a, b) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    # FPR at 95 % TPR with in-distribution as the positive class, as OpenOOD reports it
    fpr, tpr, _ = roc_curve(1 - y, -s, drop_intermediate=False)
    assert ood.fpr_at_tpr(a, b) == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-12)


def test_metrics_edge_cases() -> None:
    assert ood.auroc([0, 0], [1, 1]) == 1.0 and ood.auroc([1, 1], [0, 0]) == 0.0 and ood.auroc([1, 1], [1]) == 0.5
    assert ood.fpr_at_tpr(np.arange(100), np.arange(100, 200)) == 0.0
    with pytest.raises(InvalidInputError):
        ood.auroc([], [1.0])
    with pytest.raises(InvalidInputError):
        ood.aupr([np.nan], [1.0])


def test_threshold_keeps_the_requested_tpr(fit_feats: OODFeatures, fx: dict) -> None:
    scores = np.random.default_rng(0).normal(size=100)
    t = ood.threshold_at_tpr(scores, 0.95)
    assert np.mean(scores <= t) == 0.95 and t in scores
    for name in ("recon_error", "knn", "mahalanobis"):
        scorer = _fitted(name, fit_feats, fx)
        cal = ood.calibrate(scorer, fit_feats, n_images=N_FIT)
        kept = 1 - cal.is_ood(scorer.score(fit_feats)).mean()
        assert 0.95 <= kept <= 0.95 + 1.5 / N_FIT, name
    with pytest.raises(ConfigError):
        ood.threshold_at_tpr(scores, 1.5)


# ----------------------------------------------------------------------------------------------------
# RankMe


def _ref_rankme(z: np.ndarray) -> float:
    s = scipy.linalg.svdvals(z)
    p = s / s.sum() + 1e-7
    return float(np.exp(-np.sum(p * np.log(p))))


def test_rankme_matches_reference_and_bounds() -> None:
    rng = np.random.default_rng(0)
    iso = rng.normal(size=(256, 32))
    assert ood.rankme(iso) == pytest.approx(_ref_rankme(iso), abs=TOL)
    assert 0.85 * 32 < ood.rankme(iso) <= 32
    rank1 = np.outer(rng.normal(size=64), rng.normal(size=32))
    assert ood.rankme(rank1) == pytest.approx(1.0, abs=1e-3)
    assert 0.7 * 16 < ood.rankme(rng.normal(size=(16, 64))) <= 16  # bounded by min(N, D)


def test_rankme_monitor_windows() -> None:
    rng = np.random.default_rng(0)
    mon = ood.RankMeMonitor(window=16)
    embs = rng.normal(size=(20, 32))
    values = [mon.update(e) for e in embs]
    assert values[:15] == [None] * 15 and all(isinstance(v, float) for v in values[15:])
    assert values[-1] == pytest.approx(_ref_rankme(embs[-16:]), abs=TOL)  # the window slides
    collapsed = ood.RankMeMonitor(window=16)
    direction = rng.normal(size=32)
    last = [collapsed.update(torch.as_tensor(c * direction)) for c in rng.uniform(1, 2, 16)][-1]
    assert last is not None and last < 1.01 < 10 < values[-1]
    with pytest.raises(InvalidInputError):
        mon.update(np.zeros(31))
    mon.reset()
    assert len(mon) == 0 and mon.value is None
    with pytest.raises(ConfigError):
        ood.RankMeMonitor(window=1)


# ----------------------------------------------------------------------------------------------------
# Registry and errors


def test_registry_refuses_duplicates_and_names_unknowns() -> None:
    with pytest.raises(ValueError, match="already registered"):
        ood.SCORERS.register("knn")(ood.KNNScorer)
    with pytest.raises(UnknownNameError, match="did you mean 'knn'"):
        ood.make_scorer("knnn")
    with pytest.raises(ConfigError, match="bad parameters"):
        ood.make_scorer("knn", kk=3)
    assert isinstance(ood.SCORERS, Registry)
    assert set(ood.SEGMENTER_SCORERS) | set(ood.CLASSIFIER_SCORERS) == set(ood.SCORERS.names())


def test_scorer_errors(fit_feats: OODFeatures, fx: dict) -> None:
    segmenter_only = OODFeatures(recon_mse=fx["recon_fit"], mask_entropy=fx["ent_fit"], embedding=fx["emb_fit"])
    with pytest.raises(ConfigError, match="logits"):
        ood.make_scorer("energy").score(segmenter_only)
    with pytest.raises(ConfigError, match="labels"):
        ood.make_scorer("rmd").fit(fit_feats)
    with pytest.raises(TTARuntimeError, match="not fitted"):
        ood.make_scorer("knn").score(fit_feats)
    with pytest.raises(ConfigError, match="constant"):
        ood.make_scorer("recon_error").fit(OODFeatures(recon_mse=np.ones(5)))
    with pytest.raises(InvalidInputError, match="batch size"):
        OODFeatures(recon_mse=np.ones(3), embedding=np.ones((4, 2)))
    with pytest.raises(ModelLoadError, match="missing"):
        ood.make_scorer("knn").load_state_dict({})


# ----------------------------------------------------------------------------------------------------
# Calibration files


def _calibrations(fit_feats: OODFeatures, fx: dict, sha: str | None = None) -> dict[str, ood.Calibration]:
    out = {}
    for name in ("recon_error", "knn", "mahalanobis", "energy", "vim"):
        scorer = _fitted(name, fit_feats, fx, **({"k": 7} if name == "knn" else {}))
        out[name] = ood.calibrate(scorer, fit_feats, n_images=N_FIT, seed=VAL_SEED, weights_sha256=sha)
    return out


def test_calibration_round_trip(tmp_path, fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    cals = _calibrations(fit_feats, fx)
    folder = ood.save_calibration(tmp_path, cals)
    assert sorted(p.name for p in folder.iterdir()) == ["calibration.json", "state.npz"]
    doc = json.loads((folder / "calibration.json").read_text())
    assert doc["sign"] == "higher = more out of distribution" and doc["calibrations"]["knn"]["params"] == {"k": 7}
    with np.load(folder / "state.npz", allow_pickle=False) as z:
        assert "knn/bank" in z.files
    loaded = ood.load_calibration(tmp_path)
    assert loaded.keys() == cals.keys()
    for name, cal in cals.items():
        got = loaded[name]
        assert (got.threshold, got.tpr, got.n_images, got.seed, got.params) == (cal.threshold, cal.tpr, N_FIT, VAL_SEED, cal.params)
        assert got.state.keys() == cal.state.keys()
        for k, v in cal.state.items():
            np.testing.assert_array_equal(got.state[k], v)
        np.testing.assert_array_equal(got.score(test_feats), cal.score(test_feats))


def test_missing_calibration_says_how_to_fit(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=r"no OOD calibration in .*; fit one with `tta-runtime ood fit --model "):
        ood.load_calibration(tmp_path)


def test_calibration_for_other_weights_is_refused(tiny_model_dir, tmp_path, fit_feats: OODFeatures, fx: dict) -> None:
    card = json.loads((tiny_model_dir / "card.json").read_text())
    dim = int(fit_feats.embedding.shape[1])
    card["segmenter"]["slot_dim"] = dim  # the calibration's feature width must match what the card implies
    (tmp_path / "card.json").write_text(json.dumps(card))
    ood.save_calibration(tmp_path, _calibrations(fit_feats, fx, sha=card["weights"]["sha256"]))
    assert set(ood.load_calibration(tmp_path)) == {"recon_error", "knn", "mahalanobis", "energy", "vim"}
    ood.save_calibration(tmp_path, _calibrations(fit_feats, fx, sha="0" * 64))
    with pytest.raises(ModelLoadError, match="fitted for weights 000000000000"):
        ood.load_calibration(tmp_path)


def test_corrupt_calibration_is_a_load_error(tmp_path, fit_feats: OODFeatures, fx: dict) -> None:
    folder = ood.save_calibration(tmp_path, _calibrations(fit_feats, fx))
    doc = json.loads((folder / "calibration.json").read_text())
    doc["calibrations"]["knn"]["scorer"] = "knnn"
    (folder / "calibration.json").write_text(json.dumps(doc))
    with pytest.raises(ModelLoadError, match="unknown OOD scorer 'knnn'"):
        ood.load_calibration(tmp_path)
    (folder / "calibration.json").write_text("{")
    with pytest.raises(ModelLoadError, match="cannot read"):
        ood.load_calibration(tmp_path)


# ----------------------------------------------------------------------------------------------------
# Features from a forward pass


TINY = SegmenterConfig(
    resolution=16, num_slots=3, slot_dim=16, encoder_channels=8, encoder_layers=2, decoder_width=16, decoder_blocks=1
)


@pytest.fixture(scope="module")
def tiny_model() -> SlotSegmenter:
    torch.manual_seed(0)
    return SlotSegmenter(TINY).eval()


def test_features_match_reference(tiny_model: SlotSegmenter) -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoded = tiny_model.encode(x)
        out, feats = ood.forward_with_features(tiny_model, x)
        enc_feats = ood.features_from_output(tiny_model, x, out, embedding="encoder")
    img = x.permute(0, 2, 3, 1).reshape(3, -1, 3).numpy().astype(np.float64)  # (B, P, 3)
    recon, masks = out.reconstruction.numpy().astype(np.float64), out.masks.numpy().astype(np.float64)
    np.testing.assert_allclose(feats.recon_mse.numpy(), ((recon - img) ** 2).mean(axis=(1, 2)), rtol=TOL, atol=1e-7)
    np.testing.assert_allclose(feats.mask_entropy.numpy(), scipy.stats.entropy(masks, axis=1).mean(axis=1), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(feats.mask_disagreement.numpy(), _ref_disagreement(masks, out.attention.numpy()), rtol=1e-4, atol=TOL)
    np.testing.assert_allclose(feats.embedding.numpy(), out.slots.numpy().mean(axis=1) if ood.DEFAULT_EMBEDDING == "slots"
                               else encoded.numpy().mean(axis=1), rtol=TOL, atol=1e-6)
    np.testing.assert_allclose(enc_feats.embedding.numpy(), encoded.numpy().mean(axis=1), rtol=TOL, atol=1e-6)
    with torch.no_grad():
        meanstd = ood.features_from_output(tiny_model, x, out, embedding="encoder_meanstd").embedding.numpy()
    enc64 = encoded.numpy().astype(np.float64)
    np.testing.assert_allclose(meanstd, np.concatenate([enc64.mean(axis=1), enc64.std(axis=1, ddof=1)], axis=1), rtol=1e-4, atol=1e-6)
    assert feats.recon_mse.shape == (3,) and feats.embedding.shape == (3, TINY.slot_dim)
    with pytest.raises(InvalidInputError, match="every pixel"):
        ood.features_from_output(tiny_model, x, tiny_model(x, pixel_idx=torch.arange(10)))


def _ref_disagreement(masks: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """Mean over foreground pixels of KL(masks || attention), foreground = pixels whose argmax slot is not
    the slot with the most mass; 0 without foreground."""
    masks, attention = masks.astype(np.float64), attention.astype(np.float64)
    kl = scipy.stats.entropy(masks, attention, axis=1)  # (B, P): scipy's entropy(p, q) is KL(p || q)
    fg = masks.argmax(axis=1) != masks.sum(axis=2).argmax(axis=1)[:, None]
    return (kl * fg).sum(axis=1) / np.maximum(fg.sum(axis=1), 1)


def test_mask_disagreement_matches_reference_with_and_without_foreground() -> None:
    g = torch.Generator().manual_seed(3)
    b, k, s = 4, 5, 8
    masks = (3 * torch.randn(b, k, s * s, generator=g)).softmax(dim=1)
    masks[3] = (torch.randn(k, s * s, generator=g) + 20 * torch.eye(k)[0][:, None]).softmax(dim=0)  # one slot everywhere
    attention = torch.randn(b, k, s * s, generator=g).softmax(dim=1)
    image = torch.rand(b, 3, s, s, generator=g)
    out = SegmenterOutput(masks, torch.rand(b, s * s, 3, generator=g), torch.rand(b, k, s * s, 3, generator=g),
                          masks.log(), torch.randn(b, k, 6, generator=g), attention)
    feats = ood.features_from_output(None, image, out, encoded=torch.randn(b, s * s, 6, generator=g))
    ref = _ref_disagreement(masks.numpy(), attention.numpy())
    assert (ref[:3] > 0).all() and ref[3] == 0.0
    np.testing.assert_allclose(feats.mask_disagreement.numpy(), ref, rtol=1e-5, atol=TOL)


def test_fit_and_eval_on_a_tiny_model(tiny_model: SlotSegmenter) -> None:
    cals = ood_eval.fit_ood(tiny_model, n_images=6, n_threshold=6, scorers=("recon_error", "mask_entropy", "knn", "mahalanobis"))
    assert {c.seed for c in cals.values()} == {VAL_SEED} and cals["knn"].n_threshold == 6
    # Mahalanobis on the encoder features' mean and std (ood_eval.SCORER_EMBEDDINGS), the rest on the mean
    assert cals["mahalanobis"].embedding == "encoder_meanstd" and cals["knn"].embedding == "encoder"
    assert cals["mahalanobis"].state["means"].shape[-1] == 2 * TINY.slot_dim
    same = ood_eval.fit_ood(tiny_model, n_images=6, n_threshold=6, scorers=("mahalanobis",), embeddings={})
    assert same["mahalanobis"].embedding == "encoder"
    report = ood_eval.eval_ood(tiny_model, cals, splits=("textured_background", "unseen_shapes"), n_images=4)
    assert report["seed"] == TEST_SEED
    for split in ("textured_background", "unseen_shapes"):
        for name in cals:
            assert set(report["splits"][split][name]) == {"auroc", "aupr", "fpr95", "flagged"}
            assert 0 <= report["splits"][split][name]["auroc"] <= 1
    far = report["far_shift"]
    assert far["best"] in cals
    for split, top in far["best_per_split"].items():  # each family's best scorer on its own
        assert top["auroc"] == max(report["splits"][split][n]["auroc"] for n in cals)
        assert top["meets_target"] == (top["auroc"] >= 0.95)
    assert far["meets_target_per_split"] == all(t["meets_target"] for t in far["best_per_split"].values())
    with pytest.raises(ConfigError, match="test seed"):
        ood_eval.fit_ood(tiny_model, n_images=4, seed=TEST_SEED)
    with pytest.raises(ConfigError, match="labels"):
        ood_eval.fit_ood(tiny_model, n_images=4, scorers=("rmd",))


def test_fit_and_eval_show_one_progress_bar_each(tiny_model: SlotSegmenter, monkeypatch) -> None:
    """progress=True: one bar per call, over every scene it reads (not one per split or embedding)."""
    bars = []

    class Bar(ood_eval.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})
            bars.append(kwargs)

    monkeypatch.setattr(ood_eval, "tqdm", Bar)
    cals = ood_eval.fit_ood(tiny_model, n_images=4, n_threshold=3, scorers=("recon_error", "knn", "mahalanobis"), progress=True)
    assert [b["total"] for b in bars] == [2 * (4 + 3)]  # two embeddings (encoder, encoder_meanstd)
    bars.clear()
    ood_eval.eval_ood(tiny_model, cals, splits=("unseen_shapes", "noise_blur"), n_images=2, progress=True)
    assert [b["total"] for b in bars] == [3 * 2 * 2]


def test_calibration_default_seed_is_the_validation_seed() -> None:
    assert ood.calibration.DEFAULT_SEED == VAL_SEED


def test_ood_package_loads_no_lab_code() -> None:
    """The runtime's OOD code never imports the scene generators, training or evaluation."""
    import subprocess
    import sys

    code = "import sys, tta_runtime.ood; print([m for m in sys.modules if m.split('.')[:2] in " \
           "(['tta_runtime', 'data'], ['tta_runtime', 'training'], ['tta_runtime', 'evaluation'], ['tta_runtime', 'cli'])])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------------------
# End to end on the shipped model


@pytest.mark.slow
def test_shipped_model_scores_textured_background_higher(runtime) -> None:
    """Any model of this family reconstructs flat in_dist scenes better than textured backgrounds."""
    model = runtime.model
    fit = ood_eval.scene_features(model, "in_dist", 4, VAL_SEED)  # a z-score: the comparison below does not depend on it
    scorer = ood.make_scorer("recon_error")
    scorer.fit(fit)
    in_dist = ood_eval.scene_features(model, "in_dist", 24, TEST_SEED)
    shifted = ood_eval.scene_features(model, "textured_background", 24, TEST_SEED)
    assert scorer.score(shifted).mean() > scorer.score(in_dist).mean()
    # the runtime's path: torch features of one image give the same score
    from tta_runtime.data.scenes import generate_scenes

    x = to_tensor(generate_scenes("textured_background", 1, TEST_SEED, size=runtime.input_size)[0])
    with torch.inference_mode():
        _, feats = ood.forward_with_features(model, x)
    assert float(scorer.torch_score(feats)[0]) == pytest.approx(scorer.score(shifted)[0], abs=1e-4)


class _ScoreGraph(torch.nn.Module):
    """The export shape of a scorer: feature tensors in, scores out, fitted state as constants."""

    def __init__(self, scorer: ood.OODScorer) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(
        self, recon: torch.Tensor, entropy: torch.Tensor, emb: torch.Tensor, logits: torch.Tensor, disagreement: torch.Tensor,
        stem: torch.Tensor,
    ) -> torch.Tensor:
        return self.scorer.torch_score(OODFeatures(recon, entropy, emb, logits, disagreement, stem))


def test_torch_scores_export_to_onnx(fit_feats: OODFeatures, test_feats: OODFeatures, fx: dict) -> None:
    """Forward-only scorers are plain tensor ops: each exports to ONNX and runs there at another batch size."""
    ort = pytest.importorskip("onnxruntime")
    import io
    import warnings

    t = test_feats.torch()
    args = (t.recon_mse, t.mask_entropy, t.embedding, t.logits, t.mask_disagreement, t.stem)
    names = ["recon", "entropy", "emb", "logits", "disagreement", "stem"]
    small = test_feats.numpy()
    for name in ood.SCORERS.names():
        scorer = _fitted(name, fit_feats, fx)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about constants: the fitted state is meant to be one
            torch.onnx.export(
                _ScoreGraph(scorer), args, buf, dynamo=False, input_names=names, output_names=["score"],
                dynamic_axes={n: {0: "batch"} for n in [*names, "score"]},
            )
        sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        feeds = {"recon": small.recon_mse[:7], "entropy": small.mask_entropy[:7], "emb": small.embedding[:7], "logits": small.logits[:7],
                 "disagreement": small.mask_disagreement[:7], "stem": small.stem[:7]}
        wanted = {i.name for i in sess.get_inputs()}  # unused inputs are dropped from the graph
        got = sess.run(None, {k: v.astype(np.float32) for k, v in feeds.items() if k in wanted})[0]
        np.testing.assert_allclose(got, scorer.score(test_feats)[:7], rtol=1e-4, atol=1e-4, err_msg=name)


def test_calibration_files_are_readable_by_others(tmp_path, fit_feats: OODFeatures, fx: dict) -> None:
    """A shipped model folder is read by other users and packaged: no private modes, no temp files left."""
    old = os.umask(0o022)
    try:
        folder = ood.save_calibration(tmp_path, _calibrations(fit_feats, fx))
    finally:
        os.umask(old)
    assert sorted(p.name for p in folder.iterdir()) == ["calibration.json", "state.npz"]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in folder.iterdir())
