"""Out-of-distribution scoring: per-input scores, their calibration, and a window-level collapse monitor.

Sign convention, everywhere: **higher score = more out of distribution**.

    one forward pass -> `OODFeatures` (recon MSE, mask entropy, embedding, [logits])        features.py
      -> a registered `OODScorer` fitted on in-distribution features (`SCORERS`)   scorers.py, feature_scorers.py
      -> a `Calibration`: the fitted state + the threshold at a chosen in-distribution TPR   calibration.py
      -> saved in the model folder (`<model>/ood/calibration.json` + `state.npz`, no pickle)

    >>> cals = load_calibration(rt.folder)                              # ModelLoadError if absent
    >>> out, feats = forward_with_features(rt.model, x)                 # x (B, 3, S, S) in [0, 1]
    >>> scores = cals["knn"].score(feats); flagged = cals["knn"].is_ood(scores)

Every scorer needs only one forward pass. `score` computes in float64 numpy (what the runtime reports);
`torch_score` runs the same formula in plain tensor ops (matmul, logsumexp, topk, norms) so an exported
graph can carry it, with the fitted state as constants.

Detection metrics (AUROC, AUPR, FPR at a TPR) and RankMe, a set-level statistic over a window of
embeddings for streams, are in metrics.py. `fit_calibrations` (fit.py) fits scorers on given features and
thresholds them on held-out ones (`Runtime.calibrate` uses it on the user's images). Fitting and evaluating
calibrations on generated scenes and digits is lab work: `tta_runtime.evaluation.ood` (segmenters) and
`tta_runtime.evaluation.ood_classifier`.
"""

from tta_runtime.ood.calibration import (
    CALIBRATION_DIR,
    CALIBRATION_JSON,
    CALIBRATION_NPZ,
    Calibration,
    calibrate,
    load_calibration,
    save_calibration,
)
from tta_runtime.ood.feature_scorers import (
    KNNScorer,
    MahalanobisScorer,
    RelativeMahalanobisScorer,
    ViMScorer,
    vim_dim,
)
from tta_runtime.ood.features import (
    DEFAULT_EMBEDDING,
    Embedding,
    OODFeatures,
    features_from_output,
    forward_with_features,
)
from tta_runtime.ood.metrics import (
    DEFAULT_TPR,
    FAR_SHIFT_SPLITS,
    FAR_SHIFT_SPLITS_BY_WORLD,
    FLAT_FAR_SHIFT_SPLITS,
    RankMeMonitor,
    aupr,
    auroc,
    far_shift_splits,
    fpr_at_tpr,
    rankme,
    threshold_at_tpr,
)
from tta_runtime.ood.scorers import (
    CLASSIFIER_SCORERS,
    DEFAULT_CLASSIFIER_SCORER,
    DEFAULT_SCORER,
    SCORERS,
    SEGMENTER_SCORERS,
    EnergyScorer,
    MaskDisagreementScorer,
    MaskEntropyScorer,
    MaxLogitScorer,
    MSPScorer,
    OODScorer,
    ReconErrorScorer,
    SoftmaxEntropyScorer,
    make_scorer,
)

__all__ = [
    "CALIBRATION_DIR",
    "CALIBRATION_JSON",
    "CALIBRATION_NPZ",
    "CLASSIFIER_SCORERS",
    "DEFAULT_CLASSIFIER_SCORER",
    "DEFAULT_EMBEDDING",
    "DEFAULT_SCORER",
    "DEFAULT_TPR",
    "FAR_SHIFT_SPLITS",
    "FAR_SHIFT_SPLITS_BY_WORLD",
    "FLAT_FAR_SHIFT_SPLITS",
    "SCORERS",
    "SEGMENTER_SCORERS",
    "Calibration",
    "Embedding",
    "EnergyScorer",
    "KNNScorer",
    "MSPScorer",
    "MahalanobisScorer",
    "MaskDisagreementScorer",
    "MaskEntropyScorer",
    "MaxLogitScorer",
    "OODFeatures",
    "OODScorer",
    "RankMeMonitor",
    "ReconErrorScorer",
    "RelativeMahalanobisScorer",
    "SoftmaxEntropyScorer",
    "ViMScorer",
    "aupr",
    "auroc",
    "calibrate",
    "far_shift_splits",
    "features_from_output",
    "forward_with_features",
    "fpr_at_tpr",
    "load_calibration",
    "make_scorer",
    "rankme",
    "save_calibration",
    "threshold_at_tpr",
    "vim_dim",
]
