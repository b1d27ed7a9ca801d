"""Any `nn.Module` classifier behind the runtime's classifier interface (`Runtime.from_module`, torchvision, timm).

    image (B, 3, S, S) RGB in [0, 1] -> [channel order, (x - mean) / std] -> the user's network
      -> logits (B, C) (a tensor, or a dataclass / dict with `logits`)
      -> `ClassifierOutput(logits, features)`: `features` (B, D) the input of the last `nn.Linear`
         (a forward pre-hook), or the output of the submodule named by `features` (averaged over
         its spatial axes when it has them)

Every plain `nn.BatchNorm2d` is swapped for `AdaptiveBatchNorm2d` (same state dict: the recipe chooses
source / batch / prior statistics, batch-1 safe); GroupNorm and LayerNorm layers adapt their affine
parameters as they are. The network's own state-dict keys appear under `net.`; weights files hold the
network's keys (what the user's builder returns loads them directly).

Nothing here imports or runs code named in a file: `import_builder` is called only by a caller that was
given `trust_code=True` (see `tta_runtime.custom`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tta_runtime.config import Preprocessing
from tta_runtime.errors import ConfigError, ModelLoadError
from tta_runtime.models.classifier import AdaptiveBatchNorm2d, ClassifierOutput

__all__ = ["WrappedClassifier", "convert_batchnorm", "import_builder", "load_into", "logits_of"]


def convert_batchnorm(module: nn.Module) -> int:
    """Replace every `nn.BatchNorm2d` (subclasses included, e.g. timm's or a user's own) by an
    `AdaptiveBatchNorm2d` with the same state; returns how many. A subclass's extra behaviour (a fused
    activation, say) is lost, so one whose forward differs is refused by the caller's parity check."""
    n = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, AdaptiveBatchNorm2d):
            new = AdaptiveBatchNorm2d(
                child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            new.load_state_dict(child.state_dict())
            ref = next(iter(child.state_dict().values()), None)
            if ref is not None:
                new.to(ref.device)
            setattr(module, name, new)
            n += 1
        else:
            n += convert_batchnorm(child)
    return n


def logits_of(out: Any) -> torch.Tensor:
    """The (B, C) logits of a network's output: a tensor, or a dataclass / object / dict with `logits`."""
    if isinstance(out, torch.Tensor):
        logits = out
    elif isinstance(out, Mapping) and "logits" in out:
        logits = out["logits"]
    elif hasattr(out, "logits"):
        logits = out.logits
    else:
        raise ConfigError(
            f"the module's forward returned {type(out).__name__}; a classifier for the runtime returns logits (B, C), "
            "or a dataclass / dict with a 'logits' field"
        )
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"the module's logits must be a (B, C) tensor, got {got}")
    return logits


class WrappedClassifier(nn.Module):
    """A classifier network behind our interface (see the module docstring).

    `preprocessing`: the card's; its `mean`, `std` and `channel_order` are applied here, so adaptation and the
    exported graph see them. `features`: a submodule name for the OOD embedding (None: the last nn.Linear's input).
    """

    def __init__(self, net: nn.Module, preprocessing: Preprocessing, *, features: str | None = None, what: str = "module") -> None:
        super().__init__()
        self.net = net
        self.what = what
        self.bgr = preprocessing.channel_order == "bgr"
        self.normalise = preprocessing.mean is not None
        mean, std = preprocessing.mean or (0.0, 0.0, 0.0), preprocessing.std or (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # The hooks write onto the hooked submodule itself (module-level functions, no closure over this
        # wrapper), so a deep copy (export, batched adaptation) reads its own copy's features.
        if features is None:
            linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ConfigError(f"{what} has no nn.Linear to read the OOD features from (its input); name the submodule "
                                  "whose output is the feature vector: features='<name>'")
            self.feature_path, self._by_input = linears[-1], True
            net.get_submodule(self.feature_path).register_forward_pre_hook(_keep_input)
        else:
            named = dict(net.named_modules())
            if features not in named or features == "":
                close = [n for n in named if n and features.split(".")[-1] in n][:5]
                raise ConfigError(f"features={features!r} names no submodule of {what}; submodules look like "
                                  f"{close or [n for n in named if n][:5]}")
            self.feature_path, self._by_input = features, False
            named[features].register_forward_hook(_keep_output)
        self.num_classes = 0  # set by `probe`

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        """(B, 3, S, S) RGB in [0, 1] -> ClassifierOutput(logits (B, C), features (B, D))."""
        hooked = self.net.get_submodule(self.feature_path)
        hooked._tta_features = None
        if self.bgr:
            x = x.flip(1)
        if self.normalise:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        logits = logits_of(self.net(x))
        feats = hooked._tta_features
        hooked._tta_features = None
        if feats is None:  # the hooked layer never ran: the OOD scorers must not silently get the logits
            raise ConfigError(f"{self.what}'s forward never ran its submodule {self.feature_path!r}, whose "
                              f"{'input' if self._by_input else 'output'} is read as the OOD features; name the submodule "
                              "whose output is the feature vector: features='<name>'")
        if not isinstance(feats, torch.Tensor):
            raise ConfigError(f"the features submodule of {self.what} returned {type(feats).__name__}, not a tensor")
        if feats.ndim > 2:  # (B, C, H, W...): one vector per image
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        return ClassifierOutput(logits=logits, features=feats.flatten(1))

    def probe(self, size: int) -> tuple[int, int]:
        """(num_classes, feature_dim) from one forward on two blank images; `ConfigError` when the module
        cannot take (B, 3, size, size) input or returns no (B, C) logits."""
        param = next(iter(self.parameters()), None)
        x = torch.full((2, 3, size, size), 0.5, device=param.device if param is not None else "cpu")
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self(x)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the user's forward raises on our input
            raise ConfigError(f"{self.what} fails on a (2, 3, {size}, {size}) input (input_size={size}): {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        finally:
            self.train(was)
        if out.logits.shape[0] != 2 or out.logits.shape[1] < 2:
            raise ConfigError(f"{self.what} returned logits of shape {tuple(out.logits.shape)} for 2 images; expected (2, C), C >= 2")
        self.num_classes = int(out.logits.shape[1])
        return self.num_classes, int(out.features.shape[1])

    def weights(self) -> dict[str, torch.Tensor]:
        """The network's own state dict (no `net.` prefix), contiguous CPU tensors: what a weights file holds."""
        return {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}


def _keep_input(module: nn.Module, args: tuple[Any, ...]) -> None:
    module._tta_features = args[0]  # type: ignore[assignment]


def _keep_output(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
    module._tta_features = out  # type: ignore[assignment]


def load_into(model: WrappedClassifier, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of a network state dict into `model.net`, with the mismatched keys and shapes named."""
    own = model.net.state_dict()
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or shapes:
        raise ModelLoadError(
            f"weights in {source} do not fit {model.what}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:3]}"
        )
    model.net.load_state_dict(state, strict=True)


def import_builder(spec: str) -> Any:
    """The callable named by 'package.module:function' (imports the package: runs its code; callers check trust first)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - ImportError, or whatever the module raises on import
        raise ModelLoadError(f"cannot import {module_name!r} for the builder {spec!r}: {type(e).__name__}: {e}; it must be "
                             "importable (installed, or on sys.path) where the model is loaded") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ModelLoadError(f"{module_name!r} has no callable {attr!r} (builder {spec!r})")
    return builder
