"""Rotation prediction (TTT, Sun et al., ICML 2020; Gidaris et al. 2018): a self-supervised test-time task.

The classifier was trained jointly with a 4-way rotation head on its pooled features (see
`tta_runtime.classifier`). At test time each image is shown at 0, 90, 180 and 270 degrees and the shared
features (everything but the class head) take gradient steps on the rotation cross-entropy; the class
head then reads the adapted features. Needs a model whose card has `rotation_head = true`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tta_runtime.errors import ConfigError
from tta_runtime.adapt.methods.base import METHODS, MethodContext


def rotations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) -> the 4B rotated copies and their labels 0..3 (k * 90 degrees counter-clockwise)."""
    views = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return views, labels


@METHODS.register("rotation")
class Rotation:
    task = "classification"
    default_params = r"re:^(?!head\.)"  # the shared features and the rotation head; not the class head

    def __init__(self, context: MethodContext | None = None) -> None:
        self.needs_reset = False
        self.info: dict[str, object] = {}

    def loss(self, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if getattr(model, "rot_head", None) is None:
            raise ConfigError("method 'rotation' needs a model trained with a rotation head (card: rotation_head = true)")
        views, labels = rotations(x)
        return F.cross_entropy(model.rotation_logits(views), labels)
