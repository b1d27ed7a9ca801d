"""Export kind of every classifier (the digits CNNs, torchvision / timm, `Runtime.from_module` models).

Part `predictor`: "image" (B, 3, S, S) float RGB in [0, 1] at the model size -> "logits" (B, C) and "probs"
(B, C) (softmax over C). Part `predictor_ood` adds "ood_score" (B,) float32: the runtime's calibrated scorer
(the calibration's, with its fitted state as constants) or, uncalibrated, the energy -logsumexp(logits).

**Preprocessing.** The graph contains everything the model does to its input (the card's mean/std and
channel order live in the model wrapper, the digits CNNs standardise themselves). The geometry does not:
the runtime resizes with OpenCV's area averaging (or the card's interpolation, shorter side and centre
crop), which no ONNX Resize reproduces, so the graph takes model-size input and the manifest's
"preprocessing" says exactly which resize to apply (`Preprocessing.describe`); `tta_runtime.inputs.
prepare_image(image, preprocessing=...)` is that resize. A dynamic image size is refused for classifiers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tta_runtime.config import ModelCard
from tta_runtime.deploy.kinds import EXPORTERS, ExportKind
from tta_runtime.deploy.options import ExportOptions, TensorSpec
from tta_runtime.errors import ConfigError
from tta_runtime.frozen import FeaturePass, needs_stem
from tta_runtime.ood import OODFeatures

if TYPE_CHECKING:
    from tta_runtime.ood import Calibration

__all__ = ["CLASSIFIER_ARCHITECTURES", "ClassifierExport", "ClassifierGraph", "num_classes_of"]

# Registered for these card architectures; "python:..." cards map to "python" (see `export_kind`).
CLASSIFIER_ARCHITECTURES = ("cnn_classifier", "torchvision", "timm", "module", "python")


def num_classes_of(card: ModelCard) -> int:
    cfg = card.classifier or card.external or card.module
    if cfg is None:
        raise ConfigError(f"card {card.name!r} describes no classifier")
    return int(cfg.num_classes)


class ClassifierGraph(nn.Module):
    """A classifier's frozen path with tensor outputs: logits, probs [, ood_score]."""

    def __init__(self, model: nn.Module, part: str, calibration: Calibration | None) -> None:
        super().__init__()
        self.model = model  # its parameters appear as "model.<name>"; export renames them to "<name>"
        self.part = part
        self.calibration = calibration

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stem = self.part == "predictor_ood" and needs_stem(self.calibration)
        out, feats = FeaturePass(self.model, "classification", "encoder", stem=stem)(image)
        logits = out.logits
        probs = logits.float().softmax(dim=1).to(logits.dtype)
        if self.part != "predictor_ood":
            return logits, probs
        # float32 even in a half graph
        if stem and feats.stem is None:
            raise ConfigError("the calibrated scorer reads the first nn.Conv2d's statistics, but this model's forward pass "
                              "does not call it: export with another calibrated scorer (calibration=...)")
        feats = OODFeatures(logits=logits.float(), embedding=out.features.float(), stem=feats.stem.float() if stem else None)
        score = self.calibration.torch_score(feats) if self.calibration is not None else -torch.logsumexp(feats.logits, dim=1)
        return logits, probs, score.float()


class ClassifierExport(ExportKind):
    architecture = "classifier"
    parts = {
        "predictor": "model-size image -> logits, probs (the frozen path)",
        "predictor_ood": "the predictor plus the runtime's OOD score",
    }

    def wrap(self, model: nn.Module, card: ModelCard, part: str, opts: ExportOptions, calibration: Calibration | None) -> nn.Module:
        if opts.dynamic is not None and opts.dynamic.size is not None:
            raise ConfigError(
                "a classifier graph takes model-size input: the runtime's resize (area averaging, or the card's "
                "preprocessing) has no exact ONNX op. Drop the dynamic size (dynamic batch is fine) and resize with "
                "tta_runtime.inputs.prepare_image(image, preprocessing=card.preprocessing) (the manifest says how)"
            )
        for m in model.modules():  # the exported path uses the source statistics, as the runtime's frozen path
            if hasattr(m, "stat_mode"):
                m.stat_mode = "source"
        return ClassifierGraph(model, part, calibration if part == "predictor_ood" else None)

    def io(self, card: ModelCard, part: str, opts: ExportOptions) -> tuple[list[TensorSpec], list[TensorSpec]]:
        dt = "float16" if opts.half else "float32"
        b: int | str = "batch" if opts.dynamic is not None and opts.dynamic.batch is not None else opts.batch
        s, c = card.preprocessing.size, num_classes_of(card)
        inputs = [TensorSpec("image", dt, (b, 3, s, s), "RGB in [0, 1] at the model size: resize as the manifest's "
                             "'preprocessing' says (tta_runtime.inputs.prepare_image)")]
        outputs = [TensorSpec("logits", dt, (b, c), "class scores before softmax"),
                   TensorSpec("probs", dt, (b, c), "softmax over the classes")]
        if part == "predictor_ood":
            outputs.append(TensorSpec("ood_score", "float32", (b,), "higher = more out of distribution (before adaptation)"))
        return inputs, outputs

    def model_prefixes(self, model: nn.Module, part: str) -> tuple[str, ...] | None:
        """A wrapped network's tensors (`net.`), or the digits CNN's stages and class head (not its rotation head,
        which the frozen path never runs)."""
        inner = getattr(model, "model", model)  # the graph wrapper's model, or the model itself
        if hasattr(inner, "net"):
            return ("net.",)
        if hasattr(inner, "stages") and hasattr(inner, "head"):
            return ("stages.", "head.")
        return None

    def uncalibrated_ood(self, card: ModelCard) -> dict[str, Any]:
        return {"scorer": "energy", "threshold": None}


_KIND = ClassifierExport()
for _arch in CLASSIFIER_ARCHITECTURES:
    EXPORTERS.register(_arch)(_KIND)
