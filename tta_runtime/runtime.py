"""The runtime: one request read top to bottom.

image -> prepare (validate, RGB, resize to the card's size) -> segmenter forward (frozen path, OOD score)
-> [adaptation loop: recipe's loss on the image, gradient steps, episodic reset] -> masks mapped back to
the image's own size -> `Result`.

Thread safety: a `Runtime` owns one model; every call takes the runtime's lock for its whole duration,
so concurrent calls run one after another and each sees exactly the state it would see alone (in
episodic mode: the loaded weights). For parallel throughput, create one `Runtime` per worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapt import AdaptationReport, Adapter, StepCallback
from .config import AdaptConfig, ModelCard, RuntimeOptions, validate, with_overrides
from .errors import ConfigError, ModelLoadError
from .hub import find_model, load_card, load_optimizer_state, load_recipe, load_weights
from .inputs import PreparedImage, prepare_image, resize_image, resize_masks
from .ood import DEFAULT_SCORER, Calibration, features_from_output, load_calibration
from .registry import unknown_name_message
from .result import Result
from .segmenter import SegmenterOutput, SlotSegmenter

log = logging.getLogger(__name__)

_RUNTIME_KEYS = set(RuntimeOptions.model_fields)
_RECIPE_KEYS = set(AdaptConfig.model_fields)


def _resolve_device(name: str) -> torch.device:
    """The requested device, or a clear error: never a silent fallback to the CPU."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {name!r} is not a torch device name ('cpu', 'cuda', 'cuda:1', 'mps'): {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here; use device='cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available here; use device='cpu'")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device type {device.type!r} is not supported; use 'cpu', 'cuda' or 'mps'")
    return device


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = set(overrides) - _RUNTIME_KEYS - _RECIPE_KEYS
    if unknown:
        raise ConfigError(
            f"unknown option(s) {sorted(unknown)}; runtime options: {sorted(_RUNTIME_KEYS)}; "
            f"recipe fields: {sorted(_RECIPE_KEYS - {'name', 'description'})}"
        )
    runtime = {k: v for k, v in overrides.items() if k in _RUNTIME_KEYS}
    recipe = {k: v for k, v in overrides.items() if k not in _RUNTIME_KEYS}
    return runtime, recipe


class Runtime:
    """A loaded model plus its adaptation recipe. Build with `Runtime.from_pretrained`."""

    def __init__(
        self, model: SlotSegmenter, card: ModelCard, *, options: RuntimeOptions | None = None,
        recipe: AdaptConfig | None = None, folder: Path | None = None,
        optimizer_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.options = options or RuntimeOptions()
        self.card = card
        self.folder = folder
        self.device = _resolve_device(self.options.device)
        self.model = model.to(self.device).eval()
        recipe = recipe or load_recipe(self.options.recipe)
        if self.options.mode is not None:
            recipe = with_overrides(recipe, {"mode": self.options.mode}, "recipe")
        self.recipe = recipe
        self._adapter = Adapter(self.model, recipe, training_optimizer_state=optimizer_state)
        self._lock = threading.RLock()  # re-entrant: an on_step callback may call predict()
        self.calibration = self._load_calibration()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str] | None = None, **overrides: Any) -> Runtime:
        """Load a model by repository name (None = the default model), folder, card or weights path.

        `overrides` are runtime options (`device`, `max_pixels`, `recipe`, `mode`) or recipe fields
        (`steps`, `lr`, `params`, ...), validated; unknown names raise `ConfigError`.
        """
        runtime_kw, recipe_kw = _split_overrides(overrides)
        options = validate(RuntimeOptions, runtime_kw, "runtime options")
        folder = find_model(name_or_path)
        card = load_card(folder)
        if "recipe" not in runtime_kw:
            options = with_overrides(options, {"recipe": card.default_recipe}, "runtime options")
        recipe = load_recipe(options.recipe, **recipe_kw)
        model = SlotSegmenter(card.segmenter)
        state = load_weights(folder, card)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelLoadError(f"weights in {folder} do not fit the card's architecture: {e}") from None
        optimizer_state = load_optimizer_state(folder, card)
        return cls(model, card, options=options, recipe=recipe, folder=folder, optimizer_state=optimizer_state)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def input_size(self) -> int:
        return self.card.preprocessing.size

    # -- requests ----------------------------------------------------------------------------------
    def predict(self, image: Any, *, channel_order: str = "rgb") -> Result:
        """Segment one image without adapting. See `Result` for shapes and ranges."""
        t0 = time.perf_counter()
        prepared = prepare_image(image, size=self.input_size, channel_order=channel_order, max_pixels=self.options.max_pixels)
        x = prepared.tensor.to(self.device)
        t_prep = time.perf_counter() - t0
        with self._lock:
            t1 = time.perf_counter()
            out, ood = self._frozen_path(x)
            t_fwd = time.perf_counter() - t1
        return self._result(out, prepared, ood, None, {"preprocess_s": t_prep, "forward_s": t_fwd}, x)

    def adapt_and_predict(
        self, image: Any, *, channel_order: str = "rgb", on_step: StepCallback | None = None,
        adapt: str | None = None, **overrides: Any,
    ) -> Result:
        """Adapt to one image with the runtime's recipe (fields overridable per call), then segment it.

        `adapt` ("always" | "never" | "when_ood", default: the runtime's option) gates the adaptation:
        with "when_ood", an input the calibrated OOD scorer calls in-distribution takes the predict path
        and its report says why no step ran. In episodic mode (default) the model's parameters and
        buffers are bit-exact afterwards; in continual mode the adapted state carries over to the next
        call until `reset()`.
        """
        t0 = time.perf_counter()
        gate = self._gate(adapt)
        recipe = self._recipe_for(overrides)
        prepared = prepare_image(image, size=self.input_size, channel_order=channel_order, max_pixels=self.options.max_pixels)
        x = prepared.tensor.to(self.device)
        t_prep = time.perf_counter() - t0
        with self._lock:
            t1 = time.perf_counter()
            before, ood = self._frozen_path(x)  # the OOD score is about the input before adaptation
            t_fwd = time.perf_counter() - t1
            skip = None
            if gate == "never":
                skip = "adapt='never'"
            elif gate == "when_ood" and not ood[2]:
                skip = f"in distribution ({ood[1]} {ood[0]:.3g} <= threshold {self.calibration.threshold:.3g})"  # type: ignore[union-attr]
            if skip is None:
                final, report = self._adapter.run(x, cfg=recipe, on_step=on_step)
            else:
                final, report = before, self._skipped_report(recipe, skip, x)
        result = self._result(final, prepared, ood, report, {"preprocess_s": t_prep, "forward_s": t_fwd}, x)
        result.timings.update({f"adapt_{k}": v for k, v in report.timings.items()})
        return result

    def reset(self) -> None:
        """Back to the loaded weights (continual mode); a no-op in effect for episodic use."""
        with self._lock:
            self._adapter.reset()

    # -- helpers -----------------------------------------------------------------------------------
    def _recipe_for(self, overrides: dict[str, Any]) -> AdaptConfig:
        if not overrides:
            return self.recipe
        overrides = dict(overrides)
        base = self.recipe
        if "recipe" in overrides:
            base = load_recipe(overrides.pop("recipe"))
            if self.options.mode is not None:  # the runtime's mode outlives a per-call recipe switch
                overrides.setdefault("mode", self.options.mode)
        unknown = set(overrides) - _RECIPE_KEYS
        if unknown:
            raise ConfigError(f"unknown adaptation option(s) {sorted(unknown)}; recipe fields: {sorted(_RECIPE_KEYS)}")
        return with_overrides(base, overrides, "recipe")

    def _load_calibration(self) -> Calibration | None:
        """The calibrated OOD scorer from `<model folder>/ood/`, if the folder has one."""
        if not self.options.load_calibration:
            return None
        has = self.folder is not None and (self.folder / "ood").is_dir()
        if not has:
            if self.options.adapt == "when_ood" or self.options.ood_scorer is not None:
                load_calibration(self.folder or Path("."))  # raises, saying how to fit one
            return None
        cals = load_calibration(self.folder)  # type: ignore[arg-type]
        name = self.options.ood_scorer or (DEFAULT_SCORER if DEFAULT_SCORER in cals else sorted(cals)[0])
        if name not in cals:
            raise ConfigError(unknown_name_message("calibrated OOD scorer", name, list(cals)))
        return cals[name]

    def _gate(self, adapt: str | None) -> str:
        gate = adapt or self.options.adapt
        if gate not in ("always", "never", "when_ood"):
            raise ConfigError(f"adapt must be 'always', 'never' or 'when_ood', got {gate!r}")
        if gate == "when_ood" and self.calibration is None:
            load_calibration(self.folder or Path("."))  # raises, saying how to fit one
        return gate

    def _frozen_path(self, x: torch.Tensor) -> tuple[SegmenterOutput, tuple[float, str, bool | None, float]]:
        """Forward pass without gradients, and (ood_score, scorer, is_ood, recon_mse) for the input."""
        with torch.inference_mode():
            encoded = self.model.encode(x)
            out = self.model.forward_features(encoded)
            cal = self.calibration
            feats = features_from_output(self.model, x, out, encoded=encoded, embedding=cal.embedding if cal else "encoder")
        mse = float(feats.recon_mse[0])
        if cal is not None:
            score = float(cal.score(feats)[0])
            return out, (score, cal.scorer, bool(score > cal.threshold), mse)
        stats = self.card.ood
        if stats is None:
            return out, (mse, "recon_mse", None, mse)
        return out, ((mse - stats.recon_mse_mean) / stats.recon_mse_std, "recon_mse_z", None, mse)

    def _skipped_report(self, recipe: AdaptConfig, why: str, x: torch.Tensor) -> AdaptationReport:
        return AdaptationReport(
            recipe=recipe.name, method=recipe.method, mode=recipe.mode, params=recipe.params, params_adapted=0,
            steps_requested=recipe.steps, device=str(x.device), skipped=why, timings={"total_s": 0.0},
        )

    def _result(
        self, out: SegmenterOutput, prepared: PreparedImage, ood: tuple[float, str, bool | None, float],
        report: AdaptationReport | None, timings: dict[str, float], x: torch.Tensor,
    ) -> Result:
        s = self.input_size
        h, w = prepared.original_size
        masks = out.masks[0].detach().float().cpu().numpy().reshape(-1, s, s)  # (K, S, S)
        recon = out.reconstruction[0].detach().float().cpu().numpy().reshape(s, s, 3)
        masks = resize_masks(masks, (h, w)) if (h, w) != (s, s) else masks
        recon = resize_image(recon, (h, w)) if (h, w) != (s, s) else recon
        score, scorer, is_ood, _ = ood
        with torch.no_grad():  # this result's own reconstruction error (after adaptation, if any)
            mse = float(((out.reconstruction - x.flatten(2).transpose(1, 2)) ** 2).mean())
        return Result(
            masks=masks.astype(np.float32, copy=False),
            segmentation=masks.argmax(0).astype(np.int64),
            reconstruction=np.clip(recon, 0.0, 1.0).astype(np.float32, copy=False),
            ood_score=float(score), ood_scorer=scorer, recon_mse=mse, is_ood=is_ood, image=prepared.original_rgb,
            model=self.name, device=str(self.device), backend="torch", adaptation=report, timings=timings,
        )
