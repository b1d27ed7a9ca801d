"""BatchNorm statistics adaptation (Schneider et al. 2020; Nado et al. 2020): no gradient step at all.

The prediction normalises with statistics of the test batch instead of the training ones. With a
batch of one, the recipe mixes them with the source statistics (`norm_stats = "prior"`, strength N):
mean = (N * mu_source + n * mu_batch) / (N + n), which is what makes batch size 1 work. The recipe
sets `steps = 0`; the loop then only predicts under the recipe's `norm_stats`.
"""

from __future__ import annotations

import torch

from tta_runtime.adapt.methods.base import METHODS, MethodContext, entropy


@METHODS.register("bn_stats")
class BNStats:
    task = "classification"
    default_params = "norm"  # nothing is stepped; 'norm' keeps the report honest about what could change

    def __init__(self, context: MethodContext | None = None) -> None:
        self.needs_reset = False
        self.info: dict[str, object] = {}

    def loss(self, model: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # Only reached if a recipe gives bn_stats steps > 0: then it behaves like Tent under the same stats.
        return entropy(model(x).logits).mean()
