"""tta-runtime: test-time adaptation and inference for slot-centric segmenters.

    >>> import tta_runtime as tta
    >>> rt = tta.Runtime.from_pretrained()          # the default shipped model
    >>> res = rt.adapt_and_predict("image.png")     # adapt on the image, then segment it
    >>> res.masks.shape, res.ood_score              # (K, H, W), z-score of the reconstruction error

`import tta_runtime` needs only torch, numpy and pydantic (+ safetensors and OpenCV for weights and
images); optional backends are imported when first used.
"""

from __future__ import annotations

from tta_runtime.adapt.loop import AdaptationReport
from tta_runtime.config import AdaptConfig, ModelCard
from tta_runtime.errors import ConfigError, InvalidInputError, ModelLoadError, TTARuntimeError, UnknownNameError
from tta_runtime.hub import list_models, list_recipes, load_recipe, sample_image_path
from tta_runtime.result import Result
from tta_runtime.runtime import Runtime

__version__ = "0.1.0"

__all__ = [
    "AdaptConfig",
    "AdaptationReport",
    "ConfigError",
    "InvalidInputError",
    "ModelCard",
    "ModelLoadError",
    "Result",
    "Runtime",
    "TTARuntimeError",
    "UnknownNameError",
    "list_models",
    "list_recipes",
    "load_recipe",
    "sample_image_path",
]


def __dir__() -> list[str]:
    """The public API only (submodules stay importable by name)."""
    return [*__all__, "__version__"]
