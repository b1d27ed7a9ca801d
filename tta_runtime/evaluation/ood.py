"""OOD calibration and detection on generated scenes, for slot segmenters.

    fit_ood:  training-split validation scenes 0..n-1 -> fit each scorer; the next scenes -> its threshold
    eval_ood: training-split test scenes (negatives) vs each OOD split of that world (positives)
              -> AUROC, AUPR, FPR@95

    >>> split = train_split_of(rt.card)                                  # "in_dist" or "flat/in_dist"
    >>> cals = fit_ood(rt.model, split=split, weights_sha256=rt.card.weights.sha256)  # validation scenes
    >>> save_calibration(rt.folder, cals)                                # tta_runtime.ood
    >>> report = eval_ood(rt.model, cals)                                # the world of the calibration's split

Each model is measured in its own training world (`tta_runtime.data.scenes.world_splits`): the shapes world
("in_dist", `OOD_SPLITS`) or the flat world ("flat/in_dist", `FLAT_OOD_SPLITS`).

The scorers, calibration files and metrics are the runtime's (`tta_runtime.ood`); this module only adds
the scene data. Classifiers are calibrated in `tta_runtime.evaluation.ood_classifier`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tta_runtime.data.scenes import TEST_SEED, VAL_SEED, generate_scenes, world_splits
from tta_runtime.errors import ConfigError
from tta_runtime.models.segmenter import images_to_tensor
from tta_runtime.ood import DEFAULT_EMBEDDING, DEFAULT_TPR, SEGMENTER_SCORERS, Calibration, Embedding, far_shift_splits
from tta_runtime.ood import OODFeatures, aupr, auroc, calibrate, forward_with_features, fpr_at_tpr, make_scorer

if TYPE_CHECKING:
    from tta_runtime.config import ModelCard
    from tta_runtime.models.segmenter import SlotSegmenter

log = logging.getLogger(__name__)

__all__ = ["SCORER_EMBEDDINGS", "calibrated_split", "detection_metrics", "eval_ood", "fit_ood", "scene_features", "train_split_of"]

# Scorers that `fit_ood` fits on another embedding than DEFAULT_EMBEDDING: Mahalanobis on the encoder
# features' mean and standard deviation separates textured backgrounds better than on the mean alone, and
# no worse on any other split (chosen on validation-seed selection scenes).
SCORER_EMBEDDINGS: dict[str, Embedding] = {"mahalanobis": "encoder_meanstd"}
# The training split of each scene world: the in-distribution data of its OOD negatives and calibration.
TRAIN_SPLITS: tuple[str, ...] = ("in_dist", "flat/in_dist")


def train_split_of(card: ModelCard) -> str:
    """The split a segmenter was trained on, from its card's `training.config.train_split` ("in_dist", the
    shapes world, when the card does not record one, as older cards do not)."""
    config = (card.training or {}).get("config") or {}
    split = config.get("train_split", "in_dist") if isinstance(config, dict) else "in_dist"
    return _check_train_split(split, f"model {card.name!r}: its card's training.config.train_split")


def _check_train_split(split: object, what: str = "split") -> str:
    if split not in TRAIN_SPLITS:
        raise ConfigError(
            f"{what} is {split!r}; expected a scene world's training split: {', '.join(map(repr, TRAIN_SPLITS))} "
            "(OOD detection is measured against the world the model was trained in)"
        )
    return str(split)


def _scene_features(
    model: SlotSegmenter, split: str, n_images: int, seed: int, *, start: int, batch_size: int, embedding: Embedding,
    bar: tqdm | None,
) -> OODFeatures:
    """`scene_features`, advancing `bar` (if any) by the images of each batch."""
    images, _ = generate_scenes(split, n_images, seed=seed, size=model.cfg.resolution, start=start)
    device = next(model.parameters()).device
    parts = []
    with torch.inference_mode():
        for i in range(0, n_images, batch_size):
            x = images_to_tensor(images[i : i + batch_size]).to(device)
            parts.append(forward_with_features(model, x, embedding=embedding)[1].numpy())
            if bar is not None:
                bar.update(len(x))
    return OODFeatures.concat(parts)


def scene_features(
    model: SlotSegmenter, split: str, n_images: int, seed: int, *, start: int = 0, batch_size: int = 64,
    embedding: Embedding = DEFAULT_EMBEDDING, progress: bool = False,
) -> OODFeatures:
    """Float64 numpy features of generated scenes `start .. start+n_images-1` of `split` (frozen path)."""
    with tqdm(total=n_images, desc=split, unit="img", disable=not progress) as bar:
        return _scene_features(
            model, split, n_images, seed, start=start, batch_size=batch_size, embedding=embedding, bar=bar
        )


def fit_ood(
    model: SlotSegmenter, *, n_images: int = 256, n_threshold: int | None = None, seed: int = VAL_SEED,
    scorers: Iterable[str] = SEGMENTER_SCORERS, params: Mapping[str, Mapping[str, Any]] | None = None,
    tpr: float = DEFAULT_TPR, embedding: Embedding = DEFAULT_EMBEDDING, batch_size: int = 64,
    weights_sha256: str | None = None, progress: bool = False, embeddings: Mapping[str, Embedding] | None = None,
    split: str = "in_dist",
) -> dict[str, Calibration]:
    """Fit segmenter scorers on generated validation scenes of `split` and threshold them at `tpr`.

    Scorers are fitted on scenes 0..n_images-1 of `seed` and thresholded on the next `n_threshold`
    (default n_images), so the threshold comes from images the scorer has not seen (a KNN bank would
    otherwise find each fit image at distance 0). The test seed is refused. Pass the card's
    `weights.sha256` so `load_calibration` can tell when the model has been retrained since.
    `embeddings` names a scorer's embedding where it is not `embedding` (default: `SCORER_EMBEDDINGS` when
    `embedding` is `DEFAULT_EMBEDDING`, else none). `progress`: one bar over every scene read. `split`: the
    model's training split (`train_split_of(card)`: "in_dist" for the shapes world, "flat/in_dist" for the
    flat one); each calibration records it.
    """
    _check_train_split(split)
    if seed == TEST_SEED:
        raise ConfigError(f"seed {seed} is the test seed; calibrate on validation scenes (default seed {VAL_SEED})")
    n_threshold = n_images if n_threshold is None else n_threshold
    if n_images < 2 or n_threshold < 1:
        raise ConfigError(f"fit_ood needs n_images >= 2 and n_threshold >= 1, got {n_images} and {n_threshold}")
    params = params or {}
    built = [make_scorer(name, **params.get(name, {})) for name in scorers]
    for s in built:
        if s.needs_labels:
            raise ConfigError(f"OOD scorer {s.name!r} needs class labels; the segmenter's scorers are {', '.join(SEGMENTER_SCORERS)}")
    if embeddings is None:  # the per-scorer choices go with the default embedding only
        embeddings = SCORER_EMBEDDINGS if embedding == DEFAULT_EMBEDDING else {}
    per_scorer = dict(embeddings)
    kind_of = {s.name: per_scorer.get(s.name, embedding) for s in built}
    kinds = sorted(set(kind_of.values()))
    fit_feats, thr_feats = {}, {}
    with tqdm(total=len(kinds) * (n_images + n_threshold), desc="ood fit", unit="img", disable=not progress) as bar:
        for kind in kinds:
            bar.set_postfix_str(kind)
            kw: dict[str, Any] = {"batch_size": batch_size, "embedding": kind, "bar": bar}
            fit_feats[kind] = _scene_features(model, split, n_images, seed, start=0, **kw)
            thr_feats[kind] = _scene_features(model, split, n_threshold, seed, start=n_images, **kw)
    out = {}
    for s in built:
        kind = kind_of[s.name]
        s.fit(fit_feats[kind])
        out[s.name] = calibrate(
            s, thr_feats[kind], tpr=tpr, n_images=n_images, split=split, seed=seed, embedding=kind,
            weights_sha256=weights_sha256,
        )
        log.info("OOD scorer %s fitted on %d %s scenes; threshold %.4g", s.name, n_images, split, out[s.name].threshold)
    return out


def detection_metrics(in_scores: np.ndarray, ood_scores: np.ndarray, calibration: Calibration) -> dict[str, float]:
    """AUROC, AUPR and FPR@95 of one scorer (in-distribution = negatives), and the fraction of the OOD
    inputs over its calibrated threshold; rounded to 6 decimals for reports."""
    return {
        "auroc": round(auroc(in_scores, ood_scores), 6),
        "aupr": round(aupr(in_scores, ood_scores), 6),
        "fpr95": round(fpr_at_tpr(in_scores, ood_scores), 6),
        "flagged": round(float(np.mean(calibration.is_ood(ood_scores))), 6),
    }


def _far_shift(report: dict[str, Any], names: Iterable[str], in_dist: str = "in_dist") -> dict[str, Any] | None:
    """The far-shift summary of an `eval_ood` report: each scorer's AUROC on the far shifts of the world of
    `in_dist` (`tta_runtime.ood.far_shift_splits`) and its minimum, the best scorer overall, and the best of
    each shift family on its own (a runtime picks one scorer; a user who knows the shift they face may pick
    another). None when no far shift was evaluated."""
    far = [s for s in far_shift_splits(in_dist) if s in report["splits"]]
    if not far:
        return None
    names = list(names)
    per = {
        n: {**{s: report["splits"][s][n]["auroc"] for s in far}, "min": min(report["splits"][s][n]["auroc"] for s in far)}
        for n in names
    }
    best = max(per, key=lambda n: per[n]["min"])
    per_split = {}
    for s in far:
        top = max(names, key=lambda n: per[n][s])
        per_split[s] = {"scorer": top, "auroc": per[top][s], "meets_target": per[top][s] >= 0.95}
    return {
        "splits": far, "auroc": per, "best": best, "best_min_auroc": per[best]["min"], "target": 0.95,
        "meets_target": per[best]["min"] >= 0.95, "best_per_split": per_split,
        "meets_target_per_split": all(v["meets_target"] for v in per_split.values()),
    }


def calibrated_split(calibrations: Mapping[str, Calibration], in_dist: str | None) -> str:
    """The in-distribution split of an evaluation: `in_dist`, else the one the calibrations were fitted on;
    a ConfigError when calibrations and split disagree (the thresholds would belong to another world)."""
    fitted = sorted({c.split for c in calibrations.values()})
    if in_dist is None:
        if len(fitted) > 1:
            raise ConfigError(
                f"the calibrations were fitted on different splits ({', '.join(fitted)}); pass in_dist= or refit "
                "them together (`tta-runtime ood fit`)"
            )
        in_dist = fitted[0] if fitted else "in_dist"
    in_dist = _check_train_split(in_dist, "in_dist")
    stale = [n for n, c in calibrations.items() if c.split != in_dist]
    if stale:
        raise ConfigError(
            f"calibration(s) {', '.join(stale)} were fitted on {calibrations[stale[0]].split!r} scenes, not on the "
            f"model's training split {in_dist!r}; refit them with `tta-runtime ood fit --model MODEL`"
        )
    return in_dist


def eval_ood(
    model: SlotSegmenter, calibrations: Mapping[str, Calibration], *, splits: Sequence[str] | None = None,
    n_images: int = 256, seed: int | None = None, batch_size: int = 64, progress: bool = False,
    in_dist: str | None = None,
) -> dict[str, Any]:
    """Detection metrics on test scenes: the training split as negatives, each OOD split as positives.

    Returns {"seed", "n_images", "in_dist": {scorer: {"flagged"}}, "splits": {split: {scorer: {"auroc",
    "aupr", "fpr95", "flagged"}}}, "far_shift": {...}}; `flagged` is the fraction over the calibrated
    threshold. `in_dist`: the model's training split (default: the split the calibrations were fitted on;
    they must all have been fitted on it); `splits` default to its world's named OOD splits
    (`tta_runtime.data.scenes.world_splits`) and the far-shift summary uses its world's pair. A flat-world
    report also names its in-distribution split ("in_dist_split"). `seed` defaults to the test seed
    (`tta_runtime.data.scenes.TEST_SEED`). `progress`: one bar over every scene read, the split in its postfix.
    """
    in_dist = calibrated_split(calibrations, in_dist)
    splits = world_splits(in_dist) if splits is None else splits
    seed = TEST_SEED if seed is None else seed
    if any(c.seed == seed and c.split == in_dist for c in calibrations.values()):
        log.warning("eval_ood: seed %d is the seed the calibration was fitted on", seed)
    kinds = sorted({c.embedding for c in calibrations.values()})

    with tqdm(total=(1 + len(splits)) * len(kinds) * n_images, desc="ood eval", unit="img", disable=not progress) as bar:

        def scores(split: str) -> dict[str, np.ndarray]:
            bar.set_postfix_str(split)
            f = {
                k: _scene_features(model, split, n_images, seed, start=0, batch_size=batch_size, embedding=k, bar=bar)  # type: ignore[arg-type]
                for k in kinds
            }
            return {name: c.score(f[c.embedding]) for name, c in calibrations.items()}

        base = scores(in_dist)
        report: dict[str, Any] = {
            "seed": seed, "n_images": n_images, "sign": "higher = more out of distribution",
            **({} if in_dist == "in_dist" else {"in_dist_split": in_dist}),  # shapes-world reports keep their layout
            "in_dist": {n: {"flagged": round(float(np.mean(calibrations[n].is_ood(s))), 6)} for n, s in base.items()},
            "splits": {},
        }
        for split in splits:
            shifted = scores(split)
            report["splits"][split] = {n: detection_metrics(base[n], shifted[n], c) for n, c in calibrations.items()}
    far_shift = _far_shift(report, calibrations, in_dist)
    if far_shift is not None:
        report["far_shift"] = far_shift
    return report
