"""When a forward may take a fast path: no autograd, nothing tracing or transforming it."""

from __future__ import annotations

import torch

__all__ = ["frozen_call"]


def frozen_call(t: torch.Tensor) -> bool:
    """True when a forward on `t` may run differently from its autograd form (tiled, in place, on gathered
    channels): no gradient wanted (`torch.no_grad` / `torch.inference_mode`), not traced or compiled for export,
    not under a torch.func transform (vmap). Those need the plain graph, whose shapes do not depend on the data."""
    return not (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t))
