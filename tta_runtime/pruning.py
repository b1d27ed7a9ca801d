"""Dynamic channel pruning of the digits CNN classifier: Fire Together Wire Together (FTWT).

FTWT (Elkerdawy et al., CVPR 2022) gives each conv -> norm -> ReLU unit a small mask predictor that reads
the tensor ENTERING the conv (so the decision exists before the conv runs): global average pool, one
Linear Cin -> Cout with bias, sigmoid; filter j is kept where sigmoid > 0.5. The predictor is a binary
classifier trained with BCE against a self-supervised target recomputed every batch from the current
backbone (``ftwt_targets``): score each filter by the spatial max of its post-norm/ReLU activation,
normalise the scores to sum to 1 per input, sort them descending and keep filters until the cumulative mass
first exceeds ``r`` (the filter that crosses ``r`` is kept). So the kept count k varies per input and layer.

Training is decoupled (FTWT's default, ``train_ftwt``): the predictor input is detached (the BCE never
reaches the backbone) and the applied mask is computed without gradient (the task loss never trains the
predictor). Loss = CE + w x BCE with w = 1 for the first half of the epochs, then 0; the backbone
fine-tunes from the shipped weights with the masks multiplied onto its activations.

The first conv (it reads the image) is never pruned; every later conv is ("units" 1..5 of the 3-stage
digits model). Three ways to run a trained ``FTWTClassifier``:

- mask-multiply (``FTWTClassifier.forward``): the full convolutions, then activations x mask. The reference
  for accuracy; no speed-up, exactly what FTWT's public code does.
- gather (``GatheredClassifier``): a static kept count k per unit; at batch 1 the top-k channels by
  predictor probability are selected and only their weight slices are convolved (index_select on the
  BN-folded weights). Real CPU speed-up, same numbers as mask-multiply with the same top-k masks.
- theoretical cost (``unit_macs``): a conv's multiply-accumulates scale with kept input x kept output
  channels; predictor and head costs are counted too.

Not here (yet): width buckets, an ONNX export of the gather path, the segmenter encoder, Runtime/CLI hooks.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .classifier import CNNClassifier, images_to_tensor, set_norm_mode
from .errors import ConfigError, InvalidInputError

__all__ = [
    "ConvUnit",
    "FTWTClassifier",
    "FTWTOutput",
    "FTWTTrainLog",
    "GatheredClassifier",
    "MaskPredictor",
    "conv_units",
    "ftwt_targets",
    "interleaved_latency",
    "predictor_macs",
    "static_ks",
    "train_ftwt",
    "unit_macs",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# The backbone seen as a chain of conv -> norm -> ReLU units


@dataclass(frozen=True)
class ConvUnit:
    """One conv -> norm -> ReLU of the backbone. ``pool_before``: a 2x2 max-pool precedes the conv.
    ``size``: the side of the conv's (square) output map at the model's resolution."""

    conv: nn.Conv2d
    norm: nn.Module
    pool_before: bool
    size: int


def conv_units(model: CNNClassifier) -> list[ConvUnit]:
    """The model's units in execution order (2 per stage)."""
    units = []
    for i, stage in enumerate(model.stages):
        size = model.cfg.resolution // 2**i
        units.append(ConvUnit(stage.conv1, stage.norm1, i > 0, size))
        units.append(ConvUnit(stage.conv2, stage.norm2, False, size))
    return units


# --------------------------------------------------------------------------------------------------
# Self-supervised targets and predictors


def ftwt_targets(act: torch.Tensor, r: float) -> torch.Tensor:
    """FTWT's target masks. ``act``: (B, C, H, W) post-norm/ReLU activation; ``r`` in (0, 1].

    Returns (B, C) float32 in {0, 1}: filter j of input b is 1 when, with the per-input scores
    s = max_hw |act| / sum_c max_hw |act| sorted descending, the mass of the filters ranked before j is < r
    (so filters are kept until the cumulative mass first reaches r, the crossing filter included). An
    all-zero activation keeps every filter. Computed without gradient.
    """
    if not 0.0 < r <= 1.0:
        raise ConfigError(f"r must be in (0, 1] (the kept share of activation-peak mass); got {r!r}")
    if act.ndim != 4:
        raise InvalidInputError(f"act must be (B, C, H, W); got shape {tuple(act.shape)}")
    with torch.no_grad():
        peak = act.detach().abs().amax(dim=(2, 3))  # (B, C)
        score = peak / peak.sum(dim=1, keepdim=True).clamp_min(1e-12)
        srt, order = score.sort(dim=1, descending=True)
        before = srt.cumsum(dim=1) - srt  # (B, C) mass ranked strictly before each filter
        keep_sorted = (before < r - 1e-6).float()  # the 1e-6 makes r = 1 drop exactly the dead filters
        return torch.zeros_like(score).scatter_(1, order, keep_sorted)


class MaskPredictor(nn.Module):
    """Global average pool then Linear(c_in, c_out): (B, c_in, H, W) -> (B, c_out) keep-logits.

    The bias starts at +3 (sigmoid 0.95: keep everything) so early fine-tuning is not hit by random masks.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, c_out)
        nn.init.constant_(self.fc.bias, 3.0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h.mean(dim=(2, 3)))


@dataclass
class FTWTOutput:
    """``logits``: (B, classes). Per unit u (index 0 = the unpruned first conv, whose entries are ones /
    None): ``masks[u]`` (B, C_u) float in {0, 1} as applied; ``mask_logits[u]`` (B, C_u) predictor logits
    or None; ``targets[u]`` (B, C_u) FTWT targets (only when asked for, else None)."""

    logits: torch.Tensor
    masks: list[torch.Tensor]
    mask_logits: list[torch.Tensor | None]
    targets: list[torch.Tensor | None] = field(default_factory=list)


class FTWTClassifier(nn.Module):
    """A ``CNNClassifier`` backbone plus one ``MaskPredictor`` per unit after the first."""

    def __init__(self, backbone: CNNClassifier) -> None:
        super().__init__()
        self.backbone = backbone
        units = conv_units(backbone)
        self.predictors = nn.ModuleList(
            MaskPredictor(u.conv.in_channels, u.conv.out_channels) for u in units[1:]
        )

    @property
    def units(self) -> list[ConvUnit]:
        return conv_units(self.backbone)

    def forward(
        self,
        x: torch.Tensor,
        *,
        masks: Sequence[torch.Tensor | None] | str = "predict",
        r: float | None = None,
        ks: Sequence[int] | None = None,
    ) -> FTWTOutput:
        """Mask-multiply forward. ``x``: (B, 3, S, S) in [0, 1].

        ``masks``: "predict" (sigmoid > 0.5 of each predictor, no gradient), "topk" (the ``ks[u]`` highest
        predictor logits of each unit: the static-k decisions, made in sequence as the gather path makes
        them), "dense" (all ones), or a list with one (B, C_u) mask (or None = ones) per unit.
        ``r``: also compute FTWT targets at that r.
        Predictor inputs are detached: predictor losses never reach the backbone.
        """
        units = self.units
        if not isinstance(masks, str) and len(masks) != len(units):
            raise InvalidInputError(f"masks needs one entry per unit ({len(units)}); got {len(masks)}")
        if isinstance(masks, str) and masks not in ("predict", "topk", "dense"):
            raise ConfigError(f"masks must be 'predict', 'topk', 'dense' or a list of tensors; got {masks!r}")
        if masks == "topk" and (ks is None or len(ks) != len(units)):
            raise ConfigError(f"masks='topk' needs ks, one kept count per unit ({len(units)}); got {ks!r}")
        h = ((x - 0.5) / 0.5).contiguous()
        applied: list[torch.Tensor] = []
        logits_u: list[torch.Tensor | None] = []
        targets: list[torch.Tensor | None] = []
        for j, unit in enumerate(units):
            if unit.pool_before:
                h = F.max_pool2d(h, 2)
            z = self.predictors[j - 1](h.detach()) if j else None  # (B, C_out)
            y = F.relu(unit.norm(unit.conv(h)))  # (B, C_out, H, W)
            targets.append(ftwt_targets(y, r) if (r is not None and j) else None)
            if isinstance(masks, str):
                if masks == "predict" and z is not None:
                    m = (z.detach() > 0).float()  # sigmoid(z) > 0.5
                elif masks == "topk" and z is not None:
                    top = z.detach().topk(int(ks[j]), dim=1).indices  # type: ignore[index]
                    m = torch.zeros_like(z).scatter_(1, top, 1.0)
                else:
                    m = torch.ones(y.shape[:2], dtype=y.dtype, device=y.device)
            else:
                given = masks[j]
                m = torch.ones(y.shape[:2], dtype=y.dtype, device=y.device) if given is None else given.to(y.dtype)
            h = y * m[:, :, None, None]
            applied.append(m)
            logits_u.append(z)
        feats = h.mean(dim=(2, 3))  # (B, D)
        return FTWTOutput(self.backbone.head(feats), applied, logits_u, targets)


# --------------------------------------------------------------------------------------------------
# Cost accounting


def unit_macs(units: Sequence[ConvUnit], kept: torch.Tensor, *, in_channels: int = 3) -> torch.Tensor:
    """Theoretical multiply-accumulates of each conv per input.

    ``kept``: (B, U) kept output channels per unit (unit 0 usually at full width). Returns (B, U) float64:
    unit u costs kept_in x kept_out x kh x kw x size^2, kept_in = kept[:, u-1] (``in_channels`` for u = 0).
    """
    kept = kept.to(torch.float64)
    if kept.ndim != 2 or kept.shape[1] != len(units):
        raise InvalidInputError(f"kept must be (B, {len(units)}); got shape {tuple(kept.shape)}")
    cols = []
    for u, unit in enumerate(units):
        k_in = kept[:, u - 1] if u else torch.full_like(kept[:, 0], float(in_channels))
        kh, kw = unit.conv.kernel_size
        cols.append(k_in * kept[:, u] * kh * kw * unit.size**2)
    return torch.stack(cols, dim=1)


def predictor_macs(units: Sequence[ConvUnit], kept: torch.Tensor) -> torch.Tensor:
    """(B,) MACs of the predictors' Linear layers on the kept input channels (the pooling is ignored)."""
    kept = kept.to(torch.float64)
    total = torch.zeros_like(kept[:, 0])
    for u in range(1, len(units)):
        total = total + kept[:, u - 1] * units[u].conv.out_channels
    return total


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class FTWTTrainLog:
    epochs: list[dict[str, float]]
    seconds: float
    static_k: list[int] | None = None  # the k per unit of the static-k fine-tuning phase, if any


def train_ftwt(
    backbone: CNNClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    r: float,
    epochs: int = 6,
    batch: int = 64,
    lr_backbone: float = 1e-2,
    lr_predictor: float = 0.1,
    predictor_optimizer: str = "sgd",
    predictor_epochs: int | None = None,
    seed: int = 0,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    static_quantile: float | None = None,
) -> tuple[FTWTClassifier, FTWTTrainLog]:
    """Decoupled FTWT training of predictors (and fine-tuning of ``backbone``, modified in place).

    ``images``: (N, S, S, 3) uint8, ``labels``: (N,) int64. Loss = CE(masked logits) + w x BCE(predictors,
    targets at r), w = 1 for the first ``predictor_epochs`` (default half of ``epochs``), then 0. Backbone:
    SGD momentum 0.9 at ``lr_backbone`` (rotation head excluded), BatchNorm in training mode; predictors:
    ``predictor_optimizer`` "sgd" (momentum 0.9, FTWT's) or "adam", at ``lr_predictor``.
    With ``static_quantile``, when the predictor loss switches off a static k per unit is fixed (that
    quantile of the predicted kept counts on ``images``, source statistics, ``static_ks``) and the backbone
    fine-tunes for the remaining epochs with the top-k masks the gather path will use (``masks="topk"``).
    Returns the model in eval() with BatchNorm on source statistics.
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1; got {epochs!r}")
    pe = max(1, epochs // 2) if predictor_epochs is None else int(predictor_epochs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FTWTClassifier(backbone)
    rng = np.random.default_rng([seed, 8])
    bb_params = [p for n, p in backbone.named_parameters() if not n.startswith("rot_head")]
    opt_b = torch.optim.SGD(bb_params, lr=lr_backbone, momentum=0.9)
    if predictor_optimizer == "adam":
        opt_p: torch.optim.Optimizer = torch.optim.Adam(model.predictors.parameters(), lr=lr_predictor)
    elif predictor_optimizer == "sgd":
        opt_p = torch.optim.SGD(model.predictors.parameters(), lr=lr_predictor, momentum=0.9)
    else:
        raise ConfigError(f"predictor_optimizer must be 'sgd' or 'adam'; got {predictor_optimizer!r}")
    t0 = time.perf_counter()
    history = []
    ks: list[int] | None = None
    for epoch in range(epochs):
        model.train()
        set_norm_mode(backbone, "train")  # ordinary BatchNorm while fine-tuning
        w = 1.0 if epoch < pe else 0.0
        if static_quantile is not None and epoch == pe:
            ks = _fit_static_ks(model, images, static_quantile)
            log.info("ftwt r=%s: static k per unit %s", r, ks)
        mode = "topk" if (static_quantile is not None and epoch >= pe) else "predict"
        sums = {"ce": 0.0, "bce": 0.0, "kept": 0.0, "agree": 0.0, "n": 0}
        perm = rng.permutation(len(images))
        with torch.enable_grad():
            for i in range(0, len(images), batch):
                idx = perm[i : i + batch]
                xb = images[idx] if augment is None else augment(images[idx], rng)
                x, y = images_to_tensor(xb), torch.from_numpy(labels[idx])
                out = model(x, r=r, masks=mode, ks=ks)
                ce = F.cross_entropy(out.logits, y)
                bce = sum(
                    F.binary_cross_entropy_with_logits(z, t)
                    for z, t in zip(out.mask_logits[1:], out.targets[1:])  # type: ignore[arg-type]
                )
                loss = ce + w * bce
                opt_b.zero_grad(set_to_none=True)
                opt_p.zero_grad(set_to_none=True)
                loss.backward()
                opt_b.step()
                if w:
                    opt_p.step()
                n = len(idx)
                sums["ce"] += ce.item() * n
                sums["bce"] += float(bce.detach()) * n / (len(out.masks) - 1)
                sums["kept"] += float(torch.cat(out.masks[1:], 1).mean()) * n
                sums["agree"] += float(
                    torch.cat([(m == t) for m, t in zip(out.masks[1:], out.targets[1:])], 1).float().mean()  # type: ignore[misc]
                ) * n
                sums["n"] += n
        line = {k: v / sums["n"] for k, v in sums.items() if k != "n"}
        line.update(epoch=epoch + 1, predictor_loss_weight=w, seconds=time.perf_counter() - t0)
        history.append(line)
        log.info("ftwt r=%s epoch %d: %s", r, epoch + 1, line)
    set_norm_mode(backbone, "source")
    model.eval()
    return model, FTWTTrainLog(history, time.perf_counter() - t0, ks)


def _fit_static_ks(model: FTWTClassifier, images: np.ndarray, quantile: float) -> list[int]:
    """``static_ks`` of the predicted kept counts on ``images`` (eval, source statistics); modes restored."""
    modes = {m: m.stat_mode for m in model.modules() if hasattr(m, "stat_mode")}
    set_norm_mode(model.backbone, "source")
    model.eval()
    with torch.no_grad():
        kept = torch.cat([
            torch.stack([m.sum(1) for m in model(images_to_tensor(images[i : i + 256])).masks], 1)
            for i in range(0, len(images), 256)
        ])
    for m, mode in modes.items():
        m.stat_mode = mode
    model.train()
    return static_ks(kept, [u.conv.out_channels for u in model.units], quantile)


# --------------------------------------------------------------------------------------------------
# Static k and the gather path


def static_ks(kept: torch.Tensor, widths: Sequence[int], quantile: float = 0.9) -> list[int]:
    """One k per unit: the ``quantile`` of the predicted kept counts ``kept`` (N, U), at least 1; unit 0 full."""
    ks = [int(widths[0])]
    for u in range(1, len(widths)):
        q = float(torch.quantile(kept[:, u].to(torch.float64), quantile))
        ks.append(int(min(widths[u], max(1, math.ceil(q - 1e-9)))))
    return ks


class GatheredClassifier:
    """The gather execution path at batch 1 with a static k per unit, or dense (``ks=None``).

    Norm layers are folded into the conv weights with the source statistics (eval-mode BatchNorm), so the
    path computes exactly the mask-multiply forward with top-k masks, only on the selected channels. Plain
    tensors, not an ``nn.Module``: a frozen inference path (call it under ``torch.inference_mode()``).
    """

    def __init__(self, model: FTWTClassifier, ks: Sequence[int] | None) -> None:
        units = model.units
        self.pool = [u.pool_before for u in units]
        self.weights, self.biases = [], []
        for u in units:
            bn = u.norm
            scale = bn.weight.detach() * torch.rsqrt(bn.running_var + bn.eps)  # (C,)
            self.weights.append((u.conv.weight.detach() * scale[:, None, None, None]).contiguous())
            self.biases.append((bn.bias.detach() - bn.running_mean * scale).contiguous())
        self.pred_w = [None] + [p.fc.weight.detach().clone() for p in model.predictors]
        self.pred_b = [None] + [p.fc.bias.detach().clone() for p in model.predictors]
        self.head_w = model.backbone.head.weight.detach().clone()
        self.head_b = model.backbone.head.bias.detach().clone()
        self.ks = None if ks is None else [int(k) for k in ks]

    def select(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The channel indices the gather path picks for ``x`` (1, 3, S, S): one (k_u,) int64 per unit."""
        return self._run(x, None)[1]

    def __call__(self, x: torch.Tensor, indices: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """(1, 3, S, S) in [0, 1] -> (1, classes) logits. ``indices``: force the kept channels per unit."""
        return self._run(x, indices)[0]

    def _run(self, x: torch.Tensor, indices: Sequence[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.ndim != 4 or x.shape[0] != 1:
            raise InvalidInputError(f"the gather path runs at batch 1: expected (1, 3, S, S); got {tuple(x.shape)}")
        h = (x - 0.5) / 0.5
        chosen: list[torch.Tensor] = []
        prev: torch.Tensor | None = None  # indices of the channels h holds (None = all)
        for u, w in enumerate(self.weights):
            if self.pool[u]:
                h = F.max_pool2d(h, 2)
            if self.ks is None or u == 0:
                idx = None
            elif indices is not None:
                idx = indices[u]
            else:
                pw = self.pred_w[u] if prev is None else self.pred_w[u].index_select(1, prev)
                z = torch.addmv(self.pred_b[u], pw, h.mean(dim=(0, 2, 3)))  # (C_out,) keep-logits
                idx = z.topk(self.ks[u]).indices
            if prev is not None:
                w = w.index_select(1, prev)
            if idx is not None:
                w, b = w.index_select(0, idx), self.biases[u].index_select(0, idx)
            else:
                b = self.biases[u]
            h = F.relu_(F.conv2d(h, w, b, padding=1))  # (1, k_u, s, s)
            chosen.append(idx if idx is not None else torch.arange(w.shape[0]))
            prev = idx
        feats = h.mean(dim=(2, 3))  # (1, k_last)
        hw = self.head_w if prev is None else self.head_w.index_select(1, prev)
        return F.linear(feats, hw, self.head_b), chosen


def interleaved_latency(fns: dict[str, Callable[[], object]], *, calls: int = 300, warmup: int = 30) -> dict[str, float]:
    """Median seconds per call of each function, called in turn (A B C A B C ...) so drift hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(calls):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
