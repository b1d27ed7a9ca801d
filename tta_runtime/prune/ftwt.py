"""TEMPORARY shim while the refactor lands: the old module's names, now in tta_runtime.prune's modules.

Delete this file once runtime.py, evaluation/bench_prune.py and tools/ import from ``tta_runtime.prune``,
``tta_runtime.training`` and ``tta_runtime.evaluation.timing``.
"""

from __future__ import annotations

import importlib
from typing import Any

from tta_runtime.prune import *  # noqa: F403
from tta_runtime.prune import __all__ as _prune_all

__all__ = list(_prune_all)

_MOVED = {"train_ftwt": "tta_runtime.training.ftwt", "FTWTTrainLog": "tta_runtime.training.ftwt",
          "interleaved_latency": "tta_runtime.evaluation.timing"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(name)
