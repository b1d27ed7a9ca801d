"""Shared fixtures: the default runtime (loaded once), scene images, a tiny model folder, state checks.

The shipped model will be retrained with the same architecture, so nothing here (or in the tests that use
it) depends on its exact outputs: tests compare the runtime with itself, check contracts, and use
properties that any model of this family has.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tta_runtime
from tta_runtime.config import ModelCard, Preprocessing, SegmenterConfig, WeightsSpec
from tta_runtime.hub import sha256_file
from tta_runtime.data.scenes import generate_scene

SCENE_SIZE = 32

# ----------------------------------------------------------------------------------------------------
# Model state: snapshots and bit-exact comparisons


def snapshot_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer, by name."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: t.detach().clone() for name, t in tensors.items()}


def changed_tensors(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> set[str]:
    """Names of the parameters and buffers that are not bit-exact equal to `snap`."""
    now = snapshot_state(model)
    assert now.keys() == snap.keys()
    return {name for name in now if not torch.equal(now[name], snap[name])}


class StateTools:
    """What the `state` fixture hands out: snapshot, list the changed tensors, assert bit-exact."""

    snapshot = staticmethod(snapshot_state)
    changed = staticmethod(changed_tensors)

    @staticmethod
    def assert_bit_exact(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
        changed = changed_tensors(model, snap)
        assert not changed, f"{len(changed)} tensors changed, e.g. {sorted(changed)[:5]}"

    @staticmethod
    def assert_all_require_grad(model: torch.nn.Module) -> None:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        assert not frozen, f"requires_grad left off for {frozen[:5]}"


@pytest.fixture(scope="session")
def state() -> StateTools:
    return StateTools()


# ----------------------------------------------------------------------------------------------------
# The default runtime


@pytest.fixture(scope="session")
def runtime() -> tta_runtime.Runtime:
    """The default shipped model with the faithful recipe (`slot_tta`, whatever the card's default), episodic.
    Shared by the session: tests must leave its weights as loaded (they compare against `source_state`);
    tests that adapt continually build their own runtime."""
    return tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta")


@pytest.fixture(scope="session")
def source_state(runtime: tta_runtime.Runtime) -> dict[str, torch.Tensor]:
    """The shared runtime's parameters and buffers as loaded (taken before any test adapts it)."""
    return snapshot_state(runtime.model)


@pytest.fixture
def fresh_runtime() -> tta_runtime.Runtime:
    """A runtime of the default model of its own (faithful recipe), for tests that change weights (continual mode)."""
    return tta_runtime.Runtime.from_pretrained("slot-shapes-32", recipe="slot_tta")


# ----------------------------------------------------------------------------------------------------
# Images


def scene_image(split: str, index: int, seed: int = 0) -> np.ndarray:
    """(32, 32, 3) uint8 RGB scene `index` of `split`."""
    return generate_scene(split, seed, index, size=SCENE_SIZE).image


@pytest.fixture(scope="session")
def scene() -> Callable[..., np.ndarray]:
    """`scene(split, index, seed=0)` -> (32, 32, 3) uint8 RGB scene image."""
    return scene_image


@pytest.fixture(scope="session")
def ood_image() -> np.ndarray:
    """(32, 32, 3) uint8 RGB: shapes on a textured background (out of the training distribution)."""
    return scene_image("textured_background", 0)


# ----------------------------------------------------------------------------------------------------
# A tiny model folder (fresh per test, so a test may corrupt its files)

TINY_SEGMENTER = SegmenterConfig(
    resolution=16, num_slots=3, slot_dim=16, encoder_channels=8, encoder_layers=2, decoder_width=16, decoder_blocks=1
)


@pytest.fixture
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A model folder (card.json + weights.safetensors) of a randomly initialised 16x16, 3-slot model."""
    from tta_runtime.models.segmenter import SlotSegmenter

    folder = tmp_path_factory.mktemp("tiny-model")
    with torch.random.fork_rng():  # seeded init without moving the session's global generator
        torch.manual_seed(0)
        model = SlotSegmenter(TINY_SEGMENTER)
    weights = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    card = ModelCard(
        name="tiny-test",
        description="random init, for tests",
        segmenter=TINY_SEGMENTER,
        preprocessing=Preprocessing(size=TINY_SEGMENTER.resolution),
        weights=WeightsSpec(file=weights.name, sha256=sha256_file(weights)),
    )
    (folder / "card.json").write_text(json.dumps(card.model_dump(mode="json"), indent=2))
    return folder


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """The CLI configures the root logger (basicConfig(force=True), -q sets ERROR); tests that run it in-process
    must not change what later tests' caplog sees."""
    import logging

    root, frozen = logging.getLogger(), logging.getLogger("tta_runtime.frozen")  # the CLI quiets the latter
    level, handlers, frozen_level = root.level, list(root.handlers), frozen.level
    yield
    root.setLevel(level)
    root.handlers[:] = handlers
    frozen.setLevel(frozen_level)
