"""Temporary: the whole core module, until it is split."""
from tta_runtime.video import core as _core

globals().update({k: v for k, v in vars(_core).items() if not k.startswith("__")})
