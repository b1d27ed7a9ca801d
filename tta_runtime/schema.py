"""The strict pydantic base of every config (`_Frozen`) and the helpers that validate and report.

`_Frozen` rejects unknown keys, never coerces strings or bools to numbers, refuses NaN and infinities and
is immutable; `validate` turns a pydantic error into one `ConfigError` naming the field, the value and what
was expected. The configs themselves are in `tta_runtime.config` (which re-exports all of this).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from tta_runtime.errors import ConfigError


class _Frozen(BaseModel):
    # strict: no str/bool -> number coercion (an int is still a valid float); finite floats only
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _plain_scalars(cls, data: Any) -> Any:
        """numpy scalars (np.int64 from an array, np.float32) are the numbers they hold; nothing else is converted."""
        if isinstance(data, dict) and any(isinstance(v, np.generic) for v in data.values()):
            return {k: _plain(v) for k, v in data.items()}
        return data


def _plain(v: Any) -> Any:
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v



def format_validation_error(err: ValidationError, what: str) -> str:
    """Turn a pydantic error into one readable message: field, value received, what was expected."""
    lines = [f"invalid {what}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        got = e.get("input")
        got_s = repr(got)
        if len(got_s) > 80:
            got_s = got_s[:77] + "..."
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {loc}: unknown field (got {got_s}); check the spelling")
        else:
            lines.append(f"  - {loc}: {e['msg']} (got {got_s})")
    return "\n".join(lines)


def validate(model: type[_Frozen], data: Any, what: str) -> Any:
    """`model.model_validate(data)` with errors turned into `ConfigError` messages."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, what)) from None


def with_overrides(cfg: _Frozen, overrides: dict[str, Any], what: str) -> Any:
    """A copy of a frozen config with fields replaced, validated like a fresh one."""
    if not overrides:
        return cfg
    data = cfg.model_dump()
    data.update(overrides)
    return validate(type(cfg), data, what)


def check_keywords(given: Iterable[str], accepted: Iterable[str], what: str) -> None:
    """`ConfigError` naming the unknown keywords of a call (`what`, e.g. "stream()") and the accepted ones."""
    known = list(accepted)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"{what} got unknown keyword(s) {unknown}; it accepts {sorted(known)}")


def keywords_of(func: Callable[..., Any], skip: int = 0) -> list[str]:
    """The names `func` takes as keywords (after its first `skip` positional parameters)."""
    params = list(inspect.signature(func).parameters.values())[skip:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds]
