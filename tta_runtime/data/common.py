"""Argument checks and the float-to-uint8 conversion shared by the data generators."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

from tta_runtime.errors import ConfigError, UnknownNameError


def is_int(value: object) -> bool:
    """An int or numpy integer, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_non_negative_int(name: str, value: object) -> None:
    """Raise `ConfigError` unless `value` is an int >= 0; `name` is the argument's name in the message."""
    if not is_int(value) or int(value) < 0:  # type: ignore[arg-type]
        raise ConfigError(f"{name} must be a non-negative int; got {value!r}.")


def check_known(name: object, known: Sequence[str], kind: str, plural: str) -> None:
    """Raise `UnknownNameError` unless `name` is one of `known`: the message names the closest match and
    lists the known names ("Unknown split 'x'. Did you mean 'y'? Known splits: a, b.")."""
    if not isinstance(name, str) or name not in known:
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"Unknown {kind} {name!r}.{hint} Known {plural}: {', '.join(known)}.")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (values outside are clipped) to uint8 0..255, rounded to the nearest level.

    Computed in float32 whatever the input dtype, so a float64 intermediate rounds as a float32 one would.
    """
    return np.clip(np.rint(np.asarray(image, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
