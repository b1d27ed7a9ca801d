"""The method protocols, the registry, and what a method may know about its model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from tta_runtime.registry import Registry

if TYPE_CHECKING:
    from tta_runtime.models.segmenter import SegmenterOutput


@dataclass
class MethodContext:
    """Resources a method may need, fixed when the adapter is built.

    - `fisher`: diagonal Fisher information by parameter name (EATA's anti-forgetting weights), or None
    - `source`: the parameters as loaded, by name (anti-forgetting anchors)
    - `num_classes`: classes of a classifier (entropy thresholds scale with ln C)
    """

    fisher: dict[str, torch.Tensor] | None = None
    source: dict[str, torch.Tensor] = field(default_factory=dict)
    num_classes: int = 0


class SegmenterMethod(Protocol):
    """`loss(out, target)`: `out` from the segmenter on the decoded pixels, `target` (B, P, 3) in [0, 1]."""

    task: ClassVar[str]  # "segmentation"
    default_params: ClassVar[str]

    def loss(self, out: SegmenterOutput, target: torch.Tensor) -> torch.Tensor: ...


class ClassifierMethod(Protocol):
    """`loss(model, x, gen)`: a scalar to minimise for the batch `x` (B, 3, S, S) in [0, 1]; a scalar
    without grad (e.g. `x.new_zeros(())`) means "no update from this batch" (a filter kept nothing).

    `gen` seeds any randomness (augmentations). After each update the loop reads `needs_reset`
    (continual mode resets the model when it turns True: SAR's collapse guard). `info` carries
    per-call facts for the report (e.g. how many samples a filter kept).
    """

    task: ClassVar[str]  # "classification"
    default_params: ClassVar[str]
    needs_reset: bool
    info: dict[str, Any]

    def loss(self, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor: ...


METHODS: Registry[type] = Registry("method")


def get_method(name: str, context: MethodContext | None = None) -> Any:
    """A fresh instance of the registered method `name` (methods with state keep it per adapter)."""
    cls = METHODS.get(name)
    return cls(context or MethodContext())


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row: (B, C) -> (B,)."""
    logp = logits.log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1)
