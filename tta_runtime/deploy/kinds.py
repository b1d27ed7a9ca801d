"""Export kinds: how one model architecture becomes graphs (its parts, their wrappers, their I/O specs).

Parts of the slot segmenter (input "image": (B, 3, S, S) float in [0, 1], S = the card's size):

- `encoder`: -> "features" (B, S*S, D)
- `predictor`: -> "masks" (B, K, S, S) in [0, 1] summing to 1 over K, "reconstruction" (B, 3, S, S),
  "slots" (B, K, D)
- `predictor_ood`: the predictor plus "ood_score" (B,) float32 (higher = more OOD: the runtime's scorer,
  i.e. the calibration's when given, else the reconstruction-error z-score from the card) and
  "recon_mse" (B,) float32. Computed in float32 even in a half-precision graph.

Slot initialisation is the learned `slots_init` (no random op in the graph; the export checks).

**Image size.** The encoder's position embedding and the coordinate-MLP decoder are defined on the
card's S x S grid, so the model itself only runs at S x S. A dynamic size puts the resizing into the
graph: "image" is then (B, 3, H, W) for any H, W in the range; the graph resizes it to S x S (bilinear,
half-pixel centres, no antialiasing: ONNX Resize has antialias only from opset 18, and the runtime's
area averaging has no ONNX op) and resizes "masks" and "reconstruction" back to H x W (bilinear; masks
stay a distribution over K). Without it the graph is S x S only and resizing is the caller's (the
runtime's `prepare_image`: area averaging when shrinking), which is what `Runtime(backend="onnxruntime")`
uses, so its results match the PyTorch path.

Another architecture registers its own `ExportKind` subclass in `EXPORTERS` under its card's architecture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.config import ModelCard
from tta_runtime.deploy.options import ExportOptions, TensorSpec
from tta_runtime.errors import ConfigError
from tta_runtime.models.segmenter import segmentation_masks
from tta_runtime.ood import features_from_output
from tta_runtime.registry import Registry, unknown_name_message

if TYPE_CHECKING:
    from tta_runtime.ood import Calibration

__all__ = ["EXPORTERS", "ExportKind", "SegmenterExport", "SegmenterGraph", "check_part", "export_kind"]


class ExportKind:
    """How one architecture becomes graphs: its parts, their wrappers and their I/O specs.

    A wrapper's parameters appear as "model.<name>" (`WRAPPER_PREFIX`); the export renames them to the
    model's own state-dict keys.
    """

    architecture: str
    parts: dict[str, str]  # part -> one-line description

    def wrap(self, model: nn.Module, card: ModelCard, part: str, opts: ExportOptions, calibration: Calibration | None) -> nn.Module:
        raise NotImplementedError

    def io(self, card: ModelCard, part: str, opts: ExportOptions) -> tuple[list[TensorSpec], list[TensorSpec]]:
        raise NotImplementedError

    def weight_prefixes(self, part: str) -> tuple[str, ...] | None:
        """State-dict prefixes of the tensors the part's graph reads (None = all of them)."""
        return None

    def model_prefixes(self, model: nn.Module, part: str) -> tuple[str, ...] | None:
        """`weight_prefixes` for this very model (a kind whose models differ in layout overrides it)."""
        return self.weight_prefixes(part)

    def ood_info(self, card: ModelCard, part: str, calibration: Calibration | None) -> dict[str, Any] | None:
        """What the "predictor_ood" part's "ood_score" is: the calibration's scorer and threshold, else `uncalibrated_ood`."""
        if part != "predictor_ood":
            return None
        if calibration is not None:
            return {"scorer": calibration.scorer, "threshold": calibration.threshold, "tpr": calibration.tpr,
                    "embedding": calibration.embedding, "calibration_weights_sha256": calibration.weights_sha256}
        return self.uncalibrated_ood(card)

    def uncalibrated_ood(self, card: ModelCard) -> dict[str, Any]:
        """The "ood_score" of a graph exported without a calibration."""
        raise NotImplementedError

    def input_info(self, card: ModelCard, opts: ExportOptions) -> dict[str, Any]:
        """What the graph's "image" input is and which resize the caller applies (the manifest's "preprocessing")."""
        pre = card.preprocessing
        resized = opts.dynamic is not None and opts.dynamic.size is not None
        return {
            "graph_input": "RGB float in [0, 1], (B, 3, H, W) in the dynamic size range" if resized
            else f"RGB float in [0, 1] at the model size, (B, 3, {pre.size}, {pre.size})",
            "resize": f"in the graph: bilinear to {pre.size}x{pre.size} (half-pixel centres, no antialiasing; not the "
            "runtime's area averaging)" if resized else f"by the caller, before the graph: {pre.describe()}",
            "runtime_function": "tta_runtime.inputs.prepare_image(image, preprocessing=Preprocessing(**card['preprocessing']))",
            "in_graph": "everything after the resize: the model's own normalisation (card preprocessing mean/std, channel order)",
            "card": pre.model_dump(mode="json"),
        }


EXPORTERS: Registry[ExportKind] = Registry("exportable architecture")
WRAPPER_PREFIX = "model."


def export_kind(card: ModelCard) -> ExportKind:
    """The registered export kind of the card's architecture (`UnknownNameError` lists the known ones);
    every "python:package.module:function" card is the kind registered as "python"."""
    return EXPORTERS.get("python" if card.architecture.startswith("python:") else card.architecture)


def check_part(kind: ExportKind, part: str) -> None:
    """`ConfigError` naming the kind's parts unless `part` is one of them."""
    if part not in kind.parts:
        raise ConfigError(unknown_name_message(f"{kind.architecture} export part", part, list(kind.parts)))


# --------------------------------------------------------------------------------------------------
# The slot segmenter


class SegmenterGraph(nn.Module):
    """The slot segmenter's frozen path as a traceable module with tensor outputs (see module docstring)."""

    def __init__(self, model: nn.Module, part: str, *, resize: bool, ood: Callable[..., torch.Tensor] | None) -> None:
        super().__init__()
        self.model = model  # its parameters appear as "model.<name>"; export renames them to "<name>"
        self.part = part
        self.resize = resize
        self.size = int(model.cfg.resolution)
        self.ood = ood

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.size
        x = F.interpolate(image, size=(s, s), mode="bilinear", align_corners=False) if self.resize else image
        encoded = self.model.encode(x)  # (B, S*S, D)
        if self.part == "encoder":
            return (encoded,)
        out = self.model.forward_features(encoded)
        seg = segmentation_masks(self.model.cfg, out)  # the card's mask_source
        b, k, _ = seg.shape
        masks = seg.reshape(b, k, s, s)  # (B, K, S, S)
        recon = out.reconstruction.transpose(1, 2).reshape(b, 3, s, s)  # (B, 3, S, S)
        extra: tuple[torch.Tensor, ...] = ()
        if self.part == "predictor_ood":
            assert self.ood is not None  # set by the wrapper for this part
            extra = self.ood(x, out, encoded)
        if self.resize:
            hw = image.shape[-2:]
            masks = F.interpolate(masks, size=hw, mode="bilinear", align_corners=False)  # convex: still sums to 1
            recon = F.interpolate(recon, size=hw, mode="bilinear", align_corners=False)
        return (masks, recon, out.slots, *extra)


def _segmenter_ood_head(card: ModelCard, calibration: Calibration | None) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """(resized image, SegmenterOutput, encoded) -> (ood_score, recon_mse), float32, as the runtime's frozen path scores."""
    stats = card.ood

    def head(x: torch.Tensor, out: Any, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 whatever the graph's precision: a z-score divides by a small std
        out32 = dataclasses.replace(out, masks=out.masks.float(), reconstruction=out.reconstruction.float(), slots=out.slots.float())
        embedding = calibration.embedding if calibration is not None else "encoder"
        feats = features_from_output(None, x.float(), out32, encoded=encoded.float(), embedding=embedding)
        mse = feats.recon_mse  # (B,)
        if calibration is not None:
            score = calibration.torch_score(feats)
        elif stats is not None:
            score = (mse - stats.recon_mse_mean) / stats.recon_mse_std
        else:
            score = mse
        return score.float(), mse

    return head


class SegmenterExport(ExportKind):
    architecture = "slot_segmenter"
    parts = {
        "encoder": "image -> encoder features",
        "predictor": "image -> masks, reconstruction, slots (the frozen path)",
        "predictor_ood": "the predictor plus the runtime's OOD score",
    }

    def wrap(self, model: nn.Module, card: ModelCard, part: str, opts: ExportOptions, calibration: Calibration | None) -> nn.Module:
        resize = opts.dynamic is not None and opts.dynamic.size is not None
        ood = _segmenter_ood_head(card, calibration) if part == "predictor_ood" else None
        return SegmenterGraph(model, part, resize=resize, ood=ood)

    def io(self, card: ModelCard, part: str, opts: ExportOptions) -> tuple[list[TensorSpec], list[TensorSpec]]:
        cfg = card.segmenter
        assert cfg is not None  # a slot_segmenter card always has one (ModelCard validates)
        dt = "float16" if opts.half else "float32"
        dyn = opts.dynamic
        b: int | str = "batch" if dyn is not None and dyn.batch is not None else opts.batch
        sized = dyn is not None and dyn.size is not None
        h: int | str = "height" if sized else cfg.resolution
        w: int | str = "width" if sized else cfg.resolution
        s, k, d = cfg.resolution, cfg.num_slots, cfg.slot_dim
        inputs = [TensorSpec("image", dt, (b, 3, h, w), "RGB in [0, 1]" + ("; resized to the model size inside" if sized else ""))]
        if part == "encoder":
            return inputs, [TensorSpec("features", dt, (b, s * s, d), "encoder features at the model size, row-major positions")]
        outputs = [
            TensorSpec("masks", dt, (b, k, h, w), "soft slot masks in [0, 1], summing to 1 over K"),
            TensorSpec("reconstruction", dt, (b, 3, h, w), "mask-weighted RGB reconstruction"),
            TensorSpec("slots", dt, (b, k, d), "slot vectors"),
        ]
        if part == "predictor_ood":
            outputs += [
                TensorSpec("ood_score", "float32", (b,), "higher = more out of distribution (before adaptation)"),
                TensorSpec("recon_mse", "float32", (b,), "mean squared reconstruction error at the model size"),
            ]
        return inputs, outputs

    def weight_prefixes(self, part: str) -> tuple[str, ...] | None:
        return ("encoder.",) if part == "encoder" else None

    def uncalibrated_ood(self, card: ModelCard) -> dict[str, Any]:
        if card.ood is not None:
            return {"scorer": "recon_mse_z", "threshold": None, "mean": card.ood.recon_mse_mean, "std": card.ood.recon_mse_std}
        return {"scorer": "recon_mse", "threshold": None}


EXPORTERS.register(SegmenterExport.architecture)(SegmenterExport())
