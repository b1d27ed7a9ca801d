"""The runtime's frozen path on ONNX Runtime (`Runtime(backend="onnxruntime")`).

The slot segmenter's `predictor_ood` part is exported once, in memory; adaptation keeps running in
PyTorch, and whenever it has changed the model's weights they are written into the graph's initializers
by name (`set_initializers`) and the session is reopened. The graph is never re-exported.

Any change counts, however it was made (an optimizer step, `load_state_dict`, an edit through `.data`, which
no version counter sees): a checksum of every weight's bytes is compared before each run. Batches of any
length run, in chunks of the graph's batch range (`max_batch`), like the PyTorch path.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tta_runtime.config import ModelCard, validate
from tta_runtime.deploy.export import export_onnx_bytes, verify_onnx_bytes
from tta_runtime.deploy.graph import load_proto, set_initializers
from tta_runtime.deploy.kinds import export_kind
from tta_runtime.deploy.onnxruntime import OnnxRuntimeBackend, OrtOptions
from tta_runtime.deploy.options import ExportError, ExportOptions
from tta_runtime.models.segmenter import SegmenterOutput

if TYPE_CHECKING:
    from tta_runtime.ood import Calibration

__all__ = ["OrtFrozenPath"]


def _fingerprint(tensors: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """CRC-32 of each tensor's bytes (about 1 ms a megabyte): it changes with any write, including edits
    through `.data`, which bypass the tensors' version counters."""
    out = []
    for t in tensors:
        raw = t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
        out.append(zlib.crc32(raw))
    return tuple(out)


class OrtFrozenPath:
    """The runtime's frozen path on ONNX Runtime for the slot segmenter: (B, 3, S, S) tensor ->
    (SegmenterOutput, [(ood_score, scorer, is_ood, recon_mse) per image]), the PyTorch path's contract.

    Exports `predictor_ood` in memory (`predictor` when `score_ood` is False: no OOD outputs, the scores come
    back NaN with scorer "off"), verified against PyTorch on 20 random images unless `verify` is False; no
    file written. Before each call it checks whether the model's weights changed (continual
    adaptation, reset) and, if so, writes them into the graph's initializers by name and reopens the session.
    """

    def __init__(
        self, model: nn.Module, card: ModelCard, *, calibration: Calibration | None, providers: Sequence[str | tuple[str, Mapping[str, Any]]],
        options: OrtOptions | Mapping[str, Any] | None = None, max_batch: int = 64, verify: bool = True,
        score_ood: bool = True,
    ) -> None:
        self.model, self.card, self.max_batch = model, card, max_batch
        self._providers, self._options = providers, options
        part = "predictor_ood" if score_ood else "predictor"
        opts = validate(ExportOptions, {"part": part, "dynamic": {"batch": (1, max_batch)}}, "frozen path export")
        data, inputs, outputs = export_onnx_bytes(model, card, opts, calibration=calibration)
        if verify:
            report = verify_onnx_bytes(data, model, card, opts, inputs, outputs, calibration=calibration, n_images=20, seed=0)
            if not report["passed"]:
                raise ExportError(f"ONNX frozen path does not reproduce the model: {report['outputs']}")
        self._proto = load_proto(data)
        self._manifest = {
            "inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs],
            "dynamic": opts.dynamic.model_dump(mode="json") if opts.dynamic else None,
        }
        self.ood = (export_kind(card).ood_info(card, part, calibration) or {}) if score_ood else {"scorer": "off"}
        self._names = [n for n, v in model.state_dict().items() if v.is_floating_point()]
        self.backend = OnnxRuntimeBackend(data, providers=providers, options=options, manifest=self._manifest)
        self._fingerprint = self._state_fingerprint()
        self.resyncs = 0

    @property
    def provider_used(self) -> str:
        return self.backend.provider_used

    def _state_fingerprint(self) -> tuple[int, ...]:
        state = self.model.state_dict()
        return _fingerprint([state[n] for n in self._names])

    def sync(self) -> bool:
        """Push the model's current weights into the session if they changed; True if it did."""
        fingerprint = self._state_fingerprint()
        if fingerprint == self._fingerprint:  # unchanged, or written back equal (an episodic restore)
            return False
        state = self.model.state_dict()
        set_initializers(self._proto, {n: state[n] for n in self._names})
        self.backend = OnnxRuntimeBackend(
            self._proto.SerializeToString(), providers=self._providers, options=self._options, manifest=self._manifest
        )
        self._fingerprint = fingerprint
        self.resyncs += 1
        return True

    def __call__(self, x: torch.Tensor) -> tuple[SegmenterOutput, list[tuple[float, str, bool | None, float]]]:
        """x (B, 3, S, S) float in [0, 1] -> (SegmenterOutput with masks (B, K, S*S), reconstruction
        (B, S*S, 3), slots; rgb / logits / attention empty), [(ood_score, scorer, is_ood, recon_mse)] per image.
        The graph's masks already follow the card's mask source (``segmentation_masks`` returns them as they are)."""
        self.sync()
        batch = x.detach().float().cpu().numpy()
        parts = [self.backend.run(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        outs = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        masks = torch.from_numpy(outs["masks"]).flatten(2).to(x.device)  # (B, K, P)
        recon = torch.from_numpy(outs["reconstruction"]).flatten(2).transpose(1, 2).to(x.device)  # (B, P, 3)
        slots = torch.from_numpy(outs["slots"]).to(x.device)
        empty = masks.new_zeros(0)  # per-slot RGB, logits and attention stay inside the graph
        out = SegmenterOutput(masks=masks, reconstruction=recon, rgb=empty, logits=empty, slots=slots, attention=empty)
        scorer, threshold = self.ood.get("scorer", "recon_mse"), self.ood.get("threshold")
        if "ood_score" not in outs:  # exported without the OOD part (score_ood=False)
            return out, [(float("nan"), "off", None, float("nan"))] * len(batch)
        return out, [
            (float(score), scorer, None if threshold is None else bool(score > threshold), float(mse))
            for score, mse in zip(outs["ood_score"], outs["recon_mse"], strict=True)
        ]
