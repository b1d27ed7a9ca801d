"""Small CNN image classifiers (the digits models) with BatchNorm whose statistics source is a switch.

Architecture (``ClassifierConfig``): per stage conv3x3 -> norm -> ReLU -> conv3x3 -> norm -> ReLU, a 2x2
max-pool between stages, global average pooling to D = widths[-1] features, then ``head`` Linear(D, C) and,
with ``rotation_head``, ``rot_head`` Linear(D, 4) that predicts the rotation (0/90/180/270 degrees) of the
input for TTT-style self-supervision (Sun et al., ICML 2020). Inputs are (B, 3, S, S) float in [0, 1]; the
model standardises them itself ((x - 0.5) / 0.5), so callers never need the training normalisation.

Normalisation statistics. With ``norm="batch"`` every norm layer is an ``AdaptiveBatchNorm2d``; which mean
and variance it normalises with is its attribute ``stat_mode``, set with ``set_norm_mode``, and does NOT
follow ``module.train()`` / ``.eval()`` (test-time methods switch grad and dropout behaviour with those,
and must not switch statistics by accident):

=========  =========================================================================================
stat_mode  mean and variance used (per channel)
=========  =========================================================================================
source     the running (training-set) statistics; nothing is updated. The default after building.
batch      the current batch's, over (N, H, W), biased variance (Tent, "BN adapt"); running stats untouched
prior      Schneider et al. 2020's mix of the two, running stats untouched:
           mean = (prior * mu_s + n * mu_b) / (prior + n),  var = (prior * var_s + n * var_b) / (prior + n)
           with n the batch size and ``prior`` (default 16) the weight of the source statistics in images
ema        the running statistics after ONE exponential-moving-average update with the current batch's
           (momentum ``ema_momentum``), done by the first forward after ``set_norm_mode`` (so once per
           adaptation call, however many forwards it makes); the buffers change, which is the point in
           continual mode (the statistics follow the stream) and is undone by the episodic restore
train      plain ``nn.BatchNorm2d`` (follows ``.train()``: batch statistics that update the running ones;
           ``.eval()``: running statistics). Only the training script uses it.
=========  =========================================================================================

Batch size 1 works in every mode: the smallest feature map at the default sizes is 8x8, so the batch
statistics are over 64 positions. With ``norm="group"`` / ``"layer"`` the layers are ``nn.GroupNorm`` (per
image, no statistics to switch). In "batch" and "prior" modes gradients flow through the batch statistics
(as Tent's updates assume); no forward disables grad (the caller decides, as the adaptation loop does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.config import ClassifierConfig, ModelCard
from tta_runtime.errors import ConfigError, InvalidInputError, ModelLoadError

__all__ = [
    "STAT_MODES",
    "AdaptiveBatchNorm2d",
    "CNNClassifier",
    "ClassifierOutput",
    "build_classifier",
    "images_to_tensor",
    "load_classifier",
    "norm_parameters",
    "rotate_quarters",
    "set_norm_mode",
]

STAT_MODES: tuple[str, ...] = ("source", "batch", "prior", "ema", "train")


@dataclass
class ClassifierOutput:
    """``logits``: (B, C) float32 class scores (before softmax). ``features``: (B, D) float32 pooled
    penultimate features, D = widths[-1] (the input of ``head``; what feature-based OOD scorers use)."""

    logits: torch.Tensor
    features: torch.Tensor


class AdaptiveBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose statistics come from ``stat_mode`` (see the module docstring), not from
    ``self.training``. ``prior`` (> 0) is the source statistics' weight in images for ``stat_mode='prior'``.
    The state dict is exactly ``nn.BatchNorm2d``'s, so weights load into either."""

    def __init__(self, num_features: int, *, stat_mode: str = "source", prior: float = 16.0, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        _check_mode(stat_mode, prior)
        self.stat_mode = stat_mode
        self.prior = float(prior)
        self.ema_momentum = 0.05
        self._ema_pending = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stat_mode == "train":
            return super().forward(x)
        if self.running_mean is None or self.running_var is None:
            raise ConfigError(f"stat_mode {self.stat_mode!r} needs running statistics (track_running_stats=True)")
        if self.stat_mode == "ema" and self._ema_pending:
            with torch.no_grad():
                var_b, mean_b = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
                self.running_mean.lerp_(mean_b, self.ema_momentum)
                self.running_var.lerp_(var_b, self.ema_momentum)
            self._ema_pending = False
        if self.stat_mode in ("source", "ema"):  # exactly eval-mode BatchNorm
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
            )
        # the batch's statistics in two passes (mean, then the mean square deviation): the same numbers as
        # torch.var_mean over (0, 2, 3), whose strided reduction is several times slower on the CPU
        mean_b = x.mean(dim=(0, 2, 3))
        dev = x - mean_b[None, :, None, None]
        var_b = (dev * dev).mean(dim=(0, 2, 3))  # (C,), biased
        if self.stat_mode == "batch":
            mean, var = mean_b, var_b
        else:  # prior
            n = x.shape[0]
            w = n / (self.prior + n)  # weight of the batch; the source statistics get 1 - w
            mean = (1 - w) * self.running_mean + w * mean_b
            var = (1 - w) * self.running_var + w * var_b
        if not torch.is_grad_enabled():  # no gradient wanted: the fused kernel, one pass over x
            return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, eps=self.eps)
        # with autograd: as a per-channel scale and shift (not F.batch_norm, whose statistics take no gradient), so
        # gradients flow through the batch statistics; one fused pass over x; buffers untouched
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale if not self.affine else self.bias - mean * scale
        return torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stat_mode={self.stat_mode!r}, prior={self.prior}"


def _norm(cfg: ClassifierConfig, channels: int) -> nn.Module:
    if cfg.norm == "batch":
        return AdaptiveBatchNorm2d(channels)
    return nn.GroupNorm(cfg.groups if cfg.norm == "group" else 1, channels)


class _Stage(nn.Sequential):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm -> ReLU; keeps the spatial size."""

    def __init__(self, cfg: ClassifierConfig, c_in: int, c_out: int) -> None:
        super().__init__()
        # no conv bias: the norm layer that follows has its own shift
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = _norm(cfg, c_out)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(cfg, c_out)
        self.act2 = nn.ReLU()


class CNNClassifier(nn.Module):
    """The classifier of ``ClassifierConfig``; inputs (B, in_channels, S, S) float in [0, 1]."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        channels = (cfg.in_channels, *cfg.widths)
        self.stages = nn.ModuleList(_Stage(cfg, c_in, c_out) for c_in, c_out in zip(channels[:-1], channels[1:]))
        self.head = nn.Linear(cfg.widths[-1], cfg.num_classes)
        self.rot_head = nn.Linear(cfg.widths[-1], 4) if cfg.rotation_head else None

    @property
    def feature_dim(self) -> int:
        return self.cfg.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, S, S) in [0, 1] -> pooled features (B, D)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise InvalidInputError(
                f"expected a (B, {self.cfg.in_channels}, S, S) float tensor in [0, 1]; got shape {tuple(x.shape)}"
            )
        # The training normalisation lives in the model. contiguous(): a channels-last input (e.g. a permuted
        # HWC numpy image) makes torch 2.13's CPU GroupNorm backward segfault when only norm parameters need
        # gradients, which is exactly what Tent-style methods ask for.
        h = ((x - 0.5) / 0.5).contiguous(memory_format=torch.contiguous_format)
        for i, stage in enumerate(self.stages):
            if i:
                h = F.max_pool2d(h, 2)  # (B, C, S / 2**i, S / 2**i)
            h = stage(h)
        return h.mean(dim=(2, 3))  # (B, D)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        f = self.features(x)
        return ClassifierOutput(logits=self.head(f), features=f)

    def rotation_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4) scores of "x was turned by k x 90 degrees counter-clockwise", k = 0..3.

        The caller rotates (see ``rotate_quarters``); raises ``ConfigError`` if the model has no rotation head.
        """
        if self.rot_head is None:
            raise ConfigError("this classifier was built without a rotation head (ClassifierConfig.rotation_head)")
        return self.rot_head(self.features(x))


def build_classifier(cfg: ClassifierConfig) -> CNNClassifier:
    """A freshly initialised classifier (torch's default init; seed the caller's generator for repeatability).
    BatchNorm layers start in ``stat_mode='source'``."""
    return CNNClassifier(cfg)


def load_classifier(name_or_path: str | Path) -> tuple[CNNClassifier, ModelCard]:
    """A shipped or local classifier (model name, folder or card path): weights checked against the card's
    sha256, loaded strictly; returned in ``eval()`` with BatchNorm in ``stat_mode='source'``."""
    from tta_runtime.hub import find_model, load_card, load_weights

    folder = find_model(name_or_path)
    card = load_card(folder)
    if card.classifier is None:
        raise ModelLoadError(f"{folder} holds a {card.task} model, not a classifier")
    model = build_classifier(card.classifier)
    try:
        model.load_state_dict(load_weights(folder, card), strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"weights in {folder} do not fit its card's classifier: {e}") from None
    return model.eval(), card


# --------------------------------------------------------------------------------------------------
# Norm layers: statistics source and affine parameters


def _check_mode(mode: object, prior: float) -> None:
    if mode not in STAT_MODES:
        raise ConfigError(f"unknown BatchNorm stat_mode {mode!r}; known: {', '.join(STAT_MODES)}")
    if not prior > 0:
        raise ConfigError(f"prior must be > 0 (weight of the source statistics, in images); got {prior!r}")


def set_norm_mode(model: nn.Module, mode: str, prior: float = 16.0, ema_momentum: float = 0.05) -> int:
    """Set ``stat_mode`` (and ``prior``) of every ``AdaptiveBatchNorm2d`` in ``model``; returns how many.

    0 for models without BatchNorm (GroupNorm models have no statistics to choose).
    """
    _check_mode(mode, prior)
    n = 0
    for m in model.modules():
        if isinstance(m, AdaptiveBatchNorm2d):
            # plain attributes, set without nn.Module.__setattr__'s checks (called twice per adaptation call)
            m.__dict__.update(stat_mode=mode, prior=float(prior), ema_momentum=float(ema_momentum), _ema_pending=mode == "ema")
            n += 1
    return n


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The affine parameters (weight, bias) of every norm layer, by their names in ``model``, in order."""
    params: dict[str, nn.Parameter] = {}
    for module_name, m in model.named_modules():
        if isinstance(m, _NORM_TYPES):
            for pname, p in m.named_parameters(recurse=False):
                params[f"{module_name}.{pname}" if module_name else pname] = p
    return params


# --------------------------------------------------------------------------------------------------
# Tensors


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 RGB -> (N, 3, S, S) float32 in [0, 1], the classifier's input."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise InvalidInputError(f"expected images (N, S, S, 3) uint8 RGB; got {got}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def rotate_quarters(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Turn image i of ``x`` (B, C, S, S) by ``k[i]`` x 90 degrees counter-clockwise (k: (B,) int in 0..3)."""
    if k.shape != (x.shape[0],):
        raise InvalidInputError(f"k must have shape ({x.shape[0]},), one rotation per image; got {tuple(k.shape)}")
    out = x.clone()
    for q in range(1, 4):
        sel = k == q
        if bool(sel.any()):
            out[sel] = torch.rot90(x[sel], q, dims=(2, 3))
    return out
