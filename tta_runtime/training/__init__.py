"""Training (lab code): one loop (`loop.train_loop`), one schedule (`schedule.Schedule`) and safetensors
checkpoints (`checkpoint`) serve every model kind; each trainer supplies its batches, loss, parameters and
validation.

- `slot`: the slot segmenter (`train`, `TrainConfig`, `write_model_folder`, `validate_model`);
- `feedforward`: the U-Net baseline of `tta_runtime.models.unet` (`train_feedforward`, `save_feedforward`);
- `classifier`: the digits classifiers (`train_classifier`, `write_classifier_folder`);
- `ftwt`: FTWT mask predictors for `tta_runtime.prune` (`train_ftwt`, `train_ftwt_segmenter`).
"""

from tta_runtime.training.checkpoint import load_checkpoint
from tta_runtime.training.classifier import (
    DEFAULT_CONFIG,
    accuracy,
    augment,
    diagonal_fisher,
    train_classifier,
    write_classifier_folder,
)
from tta_runtime.training.feedforward import (
    FeedForwardTrainConfig,
    feedforward_loss,
    main_train,
    save_feedforward,
    train_feedforward,
    validate_feedforward,
)
from tta_runtime.training.ftwt import (
    FTWTTrainLog,
    SegmenterFTWTLog,
    train_ftwt,
    train_ftwt_segmenter,
)
from tta_runtime.training.loop import Optimized, RunFolder, StepOutput, train_loop
from tta_runtime.training.schedule import Schedule
from tta_runtime.training.slot import (
    TrainConfig,
    matched_attention_loss,
    matched_bce,
    matched_mask_loss,
    train,
    validate_model,
    write_model_folder,
)

__all__ = [
    "DEFAULT_CONFIG",
    "FTWTTrainLog",
    "FeedForwardTrainConfig",
    "Optimized",
    "RunFolder",
    "Schedule",
    "SegmenterFTWTLog",
    "StepOutput",
    "TrainConfig",
    "accuracy",
    "augment",
    "diagonal_fisher",
    "feedforward_loss",
    "load_checkpoint",
    "main_train",
    "matched_attention_loss",
    "matched_bce",
    "matched_mask_loss",
    "save_feedforward",
    "train",
    "train_classifier",
    "train_feedforward",
    "train_ftwt",
    "train_ftwt_segmenter",
    "train_loop",
    "validate_feedforward",
    "validate_model",
    "write_classifier_folder",
    "write_model_folder",
]
