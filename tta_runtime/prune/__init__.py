"""Dynamic channel pruning (FTWT): mask predictors, pruned models, fast execution paths, variants on disk.

- ``predictors``: units, FTWT targets, mask predictors, ``FTWTClassifier`` (mask-multiply), cost accounting;
- ``fixed``: masks held fixed during adaptation, the deployable ``PrunedClassifier``;
- ``segmenter``: the slot segmenter's pruned encoder (``PrunedSegmenter``);
- ``fast``: the gather path the pruned models run without autograd (``gathered_forward``: only the kept
  channels, BatchNorm folded), and the static-k gather and width-bucket paths of a trained classifier;
- ``variants``: ``<model>/prune/<name>/`` folders (``PruneCard``) and ``build_pruned``.

Training (``train_ftwt``, ``train_ftwt_segmenter``) lives in ``tta_runtime.training``.
"""

from tta_runtime.prune.fast import (
    BucketedClassifier,
    FoldCache,
    GatherUnit,
    Gathered,
    GatheredClassifier,
    fit_buckets,
    fit_static_ks,
    fold_norm,
    foldable,
    frozen_call,
    gathered_forward,
    predicted_masks,
    static_ks,
)
from tta_runtime.prune.fixed import FixedMasks, PrunedClassifier, fit_fixed_masks
from tta_runtime.prune.predictors import (
    ChainMacs,
    ConvUnit,
    FTWTClassifier,
    FTWTOutput,
    MaskPredictor,
    WidthBuckets,
    choose_masks,
    conv_units,
    ftwt_targets,
    predictor_macs,
    unit_macs,
)
from tta_runtime.prune.segmenter import (
    FTWTSegmenterOutput,
    PrunedSegmenter,
    encoder_macs,
    encoder_predictor_macs,
    encoder_widths,
    model_macs,
    pruned_units,
)
from tta_runtime.prune.variants import (
    PRUNE_CARD,
    PRUNE_DIR,
    build_pruned,
    load_prune_card,
    load_pruned,
    pruned_variants,
    save_pruned,
)

__all__ = [
    "PRUNE_CARD",
    "PRUNE_DIR",
    "BucketedClassifier",
    "ChainMacs",
    "ConvUnit",
    "FTWTClassifier",
    "FTWTOutput",
    "FTWTSegmenterOutput",
    "FixedMasks",
    "FoldCache",
    "GatherUnit",
    "Gathered",
    "GatheredClassifier",
    "MaskPredictor",
    "PrunedClassifier",
    "PrunedSegmenter",
    "WidthBuckets",
    "build_pruned",
    "choose_masks",
    "conv_units",
    "encoder_macs",
    "encoder_predictor_macs",
    "encoder_widths",
    "fit_buckets",
    "fit_fixed_masks",
    "fit_static_ks",
    "fold_norm",
    "foldable",
    "frozen_call",
    "ftwt_targets",
    "gathered_forward",
    "load_prune_card",
    "load_pruned",
    "model_macs",
    "predicted_masks",
    "predictor_macs",
    "pruned_units",
    "pruned_variants",
    "save_pruned",
    "static_ks",
    "unit_macs",
]
