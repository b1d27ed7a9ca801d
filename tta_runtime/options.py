"""A `Runtime`'s own options (not the model's card, not the recipe), and how constructor keywords split
between the two. Validated like everything in `tta_runtime.config`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tta_runtime.config import MAX_PIXELS, AdaptConfig
from tta_runtime.errors import ConfigError
from tta_runtime.schema import _Frozen


class RuntimeOptions(_Frozen):
    """Options of a `Runtime` that are not part of the model or the recipe."""

    device: str = "cpu"
    max_pixels: int = Field(4096 * 4096, ge=1, le=MAX_PIXELS, description=f"largest accepted input, in pixels (H*W), at most {MAX_PIXELS:,}")
    recipe: str = Field("slot_tta", description="recipe name in adapters/ or a path to a recipe .toml")
    mode: Literal["episodic", "continual"] | None = Field(
        None, description="overrides the recipe's mode when set"
    )
    adapt: Literal["always", "never", "when_ood"] = Field(
        "always", description="when adapt_and_predict adapts: always, never, or only inputs the OOD gate flags"
    )
    ood_scorer: str | None = Field(
        None, description="calibrated scorer for ood_score / is_ood (default: the calibration's default scorer)"
    )
    backend: Literal["torch", "onnxruntime"] = Field(
        "torch", description="frozen path: PyTorch eager or ONNX Runtime (adaptation stays in PyTorch; adapted "
        "weights are pushed into the graph by name)",
    )
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU intra-op threads per request; None = chosen from the work size (one for "
        "the shipped models at batch 1) and shared between the Runtimes working at once (see tta_runtime.threads)",
    )
    onnxruntime_threads: int | None = Field(
        None, ge=0, le=1024, description="ONNX Runtime intra-op threads; None = as `threads` (or 1 when that is None "
        "and the model is small), 0 = ONNX Runtime's default (one per core)",
    )
    reset_every: int | None = Field(
        None, ge=1, le=10**9, description="continual mode: back to the loaded weights after this many adapted inputs "
        "(a reset policy against slow collapse on long streams); None = only on reset() or a method's signal",
    )
    collapse_window: int | None = Field(
        None, ge=2, le=100_000, description="continual mode, classifiers: reset when the labels predicted for the last this many "
        "adapted inputs have a histogram entropy below collapse_entropy * ln(C) (the model predicts a few classes "
        "for everything); None = off",
    )
    collapse_entropy: float = Field(0.5, gt=0, lt=1, description="threshold of the collapse monitor, as a fraction of ln(C)")
    score_ood: bool = Field(
        True, description="compute every input's OOD score; False: no OOD pass (ood_score NaN, is_ood None, "
        "adapt='when_ood' refused), and adapt_and_predict with adapt='always' skips the frozen forward altogether",
    )
    load_calibration: bool = Field(True, description="load <model>/ood/ (False: to refit it, e.g. after retraining)")
    prune: str | None = Field(
        None, description="a pruned variant in <model>/prune/ (e.g. 'r0.6'): FTWT mask predictors decide per input "
        "which channels run; adaptation reuses the masks predicted on the input before its loop",
    )


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword overrides of a runtime constructor split into (runtime options, recipe fields); `ConfigError`
    naming both lists for an unknown name."""
    runtime_keys, recipe_keys = set(RuntimeOptions.model_fields), set(AdaptConfig.model_fields)
    unknown = set(overrides) - runtime_keys - recipe_keys
    if unknown:
        raise ConfigError(
            f"unknown option(s) {sorted(unknown)}; runtime options: {sorted(runtime_keys)}; "
            f"recipe fields: {sorted(recipe_keys - {'name', 'description'})}"
        )
    runtime = {k: v for k, v in overrides.items() if k in runtime_keys}
    recipe = {k: v for k, v in overrides.items() if k not in runtime_keys}
    return runtime, recipe
