"""Model outputs to `Result`s: masks mapped back to each image's own size, or class probabilities."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from tta_runtime.adapt.loop import AdaptationReport
from tta_runtime.frozen import OODScore
from tta_runtime.inputs import PreparedImage, resize_image, resize_masks
from tta_runtime.config import SegmenterConfig
from tta_runtime.models.segmenter import segmentation_masks
from tta_runtime.result import Result


def merge_rows(before: Any, adapted: Any, chosen: list[int]) -> Any:
    """`before` (a batch output dataclass) with the rows `chosen` replaced by `adapted`'s rows, in order."""
    if len(chosen) == _batch_size(before):
        return adapted
    fields = {}
    for f in dataclasses.fields(before):
        merged = getattr(before, f.name).clone()
        merged[chosen] = getattr(adapted, f.name).to(merged.dtype)
        fields[f.name] = merged
    return type(before)(**fields)


def _batch_size(out: Any) -> int:
    return int(getattr(out, dataclasses.fields(out)[0].name).shape[0])


def slice_output(out: Any, i: int) -> Any:
    """Image `i` of a batch output dataclass, as a batch of one."""
    return type(out)(**{f.name: getattr(out, f.name)[i : i + 1] for f in dataclasses.fields(out)})


@dataclasses.dataclass
class ResultContext:
    """What every Result of one request shares: the model, where it ran, and the request's timings."""

    model: str
    device: str
    backend: str
    timings: dict[str, float]


def segmenter_results(
    cfg: SegmenterConfig, out: Any, x: torch.Tensor, prepared: list[PreparedImage], scores: list[OODScore],
    reports: list[AdaptationReport | None], pruning: list[dict[str, Any] | None], ctx: ResultContext,
) -> list[Result]:
    """One Result per image of the segmenter output `out` on the model-size inputs `x` (B, 3, S, S)."""
    s = x.shape[-1]
    with torch.no_grad():  # each result's own reconstruction error (after adaptation, if any)
        mses = ((out.reconstruction - x.flatten(2).transpose(1, 2)) ** 2).mean(dim=(1, 2)).float().cpu().numpy()
    masks_all = segmentation_masks(cfg, out)
    results = []
    for i, p in enumerate(prepared):
        h, w = p.original_size
        masks = masks_all[i].detach().float().cpu().numpy().reshape(-1, s, s)  # (K, S, S)
        recon = out.reconstruction[i].detach().float().cpu().numpy().reshape(s, s, 3)
        masks = resize_masks(masks, (h, w)) if (h, w) != (s, s) else masks
        recon = resize_image(recon, (h, w)) if (h, w) != (s, s) else recon
        results.append(Result(
            masks=masks.astype(np.float32, copy=False),
            segmentation=masks.argmax(0).astype(np.int64),
            reconstruction=np.clip(recon, 0.0, 1.0).astype(np.float32, copy=False),
            ood_score=scores[i].score, ood_scorer=scores[i].scorer, recon_mse=float(mses[i]), is_ood=scores[i].is_ood,
            image=p.original_rgb, model=ctx.model, device=ctx.device, backend=ctx.backend, adaptation=reports[i],
            timings=dict(ctx.timings), task="segmentation", pruning=pruning[i],
        ))
    return results


def classifier_results(
    logits: torch.Tensor, labels: list[str], prepared: list[PreparedImage], scores: list[OODScore],
    reports: list[AdaptationReport | None], pruning: list[dict[str, Any] | None], ctx: ResultContext,
) -> list[Result]:
    """One Result per image of the (B, C) `logits`."""
    logits_np = logits.detach().float().cpu().numpy()  # (B, C)
    probs = torch.softmax(logits.detach().float(), dim=1).cpu().numpy()
    results = []
    for i, p in enumerate(prepared):
        label = int(probs[i].argmax())
        results.append(Result(
            logits=logits_np[i].copy(), probs=probs[i].copy(), label=label,
            label_name=labels[label] if labels else "", task="classification",
            ood_score=scores[i].score, ood_scorer=scores[i].scorer, is_ood=scores[i].is_ood, image=p.original_rgb,
            model=ctx.model, device=ctx.device, backend=ctx.backend, adaptation=reports[i], timings=dict(ctx.timings),
            pruning=pruning[i],
        ))
    return results


def pruning_info(model: torch.nn.Module, variant: str | None, n: int) -> list[dict[str, Any] | None]:
    """Per image of the latest forward of a pruned `model` (variant name `variant`; None: not pruned): kept share
    per unit, the conv-MACs fraction and the execution path that ran (`last_path`)."""
    if variant is None or not getattr(model, "last_masks", None):
        return [None] * n
    kept = model.kept()  # type: ignore[operator]
    widths = torch.tensor([m.shape[1] for m in model.last_masks], dtype=torch.float64)  # type: ignore[union-attr]
    macs = model.macs_fraction()  # type: ignore[operator]
    if kept.shape[0] != n:  # a batch-level mask union (never for the frozen path): report it for each image
        kept, macs = kept.expand(n, -1), macs.expand(n)
    path = getattr(model, "last_path", None)
    shares, fractions = (kept / widths).tolist(), torch.as_tensor(macs).tolist()  # one conversion each, not per value
    return [{"variant": variant, "kept_fraction": [round(v, 4) for v in shares[i]], "macs_fraction": round(fractions[i], 4),
             **({"path": path} if path else {})} for i in range(n)]
