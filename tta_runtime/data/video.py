"""A procedural video with a distribution shift mid-stream, and its exact instance masks per frame.

The objects are the ``in_dist`` family of :mod:`tta_runtime.data.scenes` (2-4 flat-coloured circles, squares
and triangles in the training colours on a plain dim background, same sizes and colour rules, drawn
with the same shape formulas and colour helpers), now moving: each one drifts in a straight line at
0.4-1.2 % of the frame side per frame, bounces off the borders and turns slowly. Later objects are
drawn over earlier ones; an object's id (1..n, drawing order) is the same in every frame, and an
object that is momentarily hidden has no pixels in that frame's map. Rendering is hard-edged on the
pixel-centre grid, so the masks are exact.

From frame ``shift_at`` on (default: half-way) one shift switches on:

=====================  ===================================================================
kind                   what changes from ``shift_at`` on
=====================  ===================================================================
textured_background    the plain background becomes a texture (photo crop or procedural,
                       as in the ``textured_background`` split); objects unchanged
textured_objects       each object is filled with a grey texture tinted by its colour; the
                       texture moves with the object
lighting               a warm, uneven light: brightness falls from 1.1 to 0.45 across the
                       frame and blue is cut to 60 %, green to 85 %
noise                  Gaussian pixel noise, sigma 0.12, fresh every frame
=====================  ===================================================================

Determinism: a video is a function of ``(frames, shift_at, kind, size, seed)`` only; the layout and
motion come from ``np.random.default_rng([seed, 0])``, the shift from ``[seed, 1]``, the noise of frame
t from ``[seed, 2, t]``. The first ``shift_at`` frames are the same for every kind.

Public: :func:`shifted_frames` (a generator of (RGB frame, instance map) pairs, no disk),
:func:`make_shifted_video` (writes ``OUT.mp4`` with OpenCV's ``mp4v`` codec and ``OUT.npz`` with the
masks), :data:`SHIFT_KINDS`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# The scene family's own shapes, colours and textures: the video's objects are that family's objects.
from tta_runtime.data.common import is_int, to_uint8
from tta_runtime.data.drawing import (
    RADIUS_FRACTION,
    background_colour,
    distinct_colours,
    pixel_grid,
    shape_frame,
    shape_mask,
)
from tta_runtime.data.textures import background_texture, texture_gray
from tta_runtime.device import import_cv2
from tta_runtime.errors import ConfigError
from tta_runtime.registry import unknown_name_message

__all__ = ["SHIFT_KINDS", "ShiftedVideo", "make_shifted_video", "shifted_frames"]

SHIFT_KINDS: tuple[str, ...] = ("textured_background", "textured_objects", "lighting", "noise")

_SHAPES = ("circle", "square", "triangle")  # the in_dist shapes
_SPEED = (0.004, 0.012)  # fraction of the frame side per frame
_SPIN = 0.03  # max |angular velocity|, radians per frame
_NOISE_SIGMA = 0.12
_MIN_SIZE, _MAX_SIZE = 32, 512


@dataclass(frozen=True)
class ShiftedVideo:
    """What :func:`make_shifted_video` wrote: the video, its masks file and how it was made."""

    video: Path
    masks: Path
    frames: int
    size: int
    fps: float
    shift_at: int
    kind: str
    seed: int

    def to_dict(self) -> dict[str, object]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class _Object:
    shape: str
    radius: float  # px
    colour: np.ndarray  # (3,) float32 RGB in [0, 1]
    y: float
    x: float
    vy: float
    vx: float
    theta: float
    spin: float
    texture: np.ndarray | None = None  # (S, S) grey fill factor for textured_objects, in object coordinates
    y0: float = 0.0
    x0: float = 0.0


def shifted_frames(
    frames: int = 300, *, shift_at: int | None = None, kind: str = "textured_background", size: int = 128,
    seed: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``frames`` pairs ``(image, instances)``: (S, S, 3) uint8 RGB and (S, S) uint8 ids (0 = background).

    ``shift_at`` (default ``frames // 2``) is the first shifted frame; ``kind`` one of :data:`SHIFT_KINDS`.
    """
    shift_at = _check(frames, shift_at, kind, size, seed)
    rng = np.random.default_rng([seed, 0])
    shift_rng = np.random.default_rng([seed, 1])
    n = int(rng.integers(2, 5))  # like in_dist: 2-4 objects
    colours = distinct_colours(rng, n, "training")
    background = background_colour(rng)
    objects = []
    for colour in colours:
        r = rng.uniform(*RADIUS_FRACTION) * size
        speed, heading = rng.uniform(*_SPEED) * size, rng.uniform(0, 2 * math.pi)
        y, x = rng.uniform(r, size - r, size=2)
        objects.append(_Object(
            shape=_SHAPES[int(rng.integers(len(_SHAPES)))], radius=r, colour=colour, y=y, x=x,
            vy=speed * math.sin(heading), vx=speed * math.cos(heading), theta=rng.uniform(0, 2 * math.pi),
            spin=rng.uniform(-_SPIN, _SPIN), y0=y, x0=x,
        ))
    # The shift's own draws, made up front so that the frames before it do not depend on the kind.
    shifted_background = background_texture(shift_rng, size) if kind == "textured_background" else None
    if kind == "textured_objects":
        for obj in objects:
            obj.texture = texture_gray(shift_rng, size)
    light = _light_field(size) if kind == "lighting" else None

    for t in range(frames):
        shifted = t >= shift_at
        image = np.empty((size, size, 3), np.float32)
        image[:] = background
        if shifted and shifted_background is not None:
            image[:] = shifted_background
        instances = np.zeros((size, size), np.uint8)
        for i, obj in enumerate(objects, start=1):
            mask = _object_mask(obj, size)
            instances[mask] = i
            if shifted and obj.texture is not None:
                image[mask] = obj.colour * _moving_texture(obj, size)[mask][:, None]
            else:
                image[mask] = obj.colour
        if shifted and light is not None:
            image = image * light
        if shifted and kind == "noise":
            noise = np.random.default_rng([seed, 2, t]).standard_normal(image.shape, dtype=np.float32)
            image = image + np.float32(_NOISE_SIGMA) * noise
        yield to_uint8(image), instances
        for obj in objects:
            _move(obj, size)


def make_shifted_video(
    path: str | os.PathLike[str], frames: int = 300, *, shift_at: int | None = None,
    kind: str = "textured_background", size: int = 128, fps: float = 25.0, seed: int = 0,
) -> ShiftedVideo:
    """Write :func:`shifted_frames` to ``path`` (an ``.mp4``, fourcc ``mp4v``) and the masks beside it.

    The masks file is ``path`` with the suffix ``.npz``: ``instances`` (frames, S, S) uint8 (0 =
    background, ids stable over time), and the scalars ``shift_at``, ``fps``, ``seed`` and ``kind``.
    The mp4 is lossy (MPEG-4 Part 2): decoded frames differ from the rendered ones by a few grey levels,
    the masks are exact. Returns what was written.
    """
    cv2 = import_cv2()
    shift_at = _check(frames, shift_at, kind, size, seed)
    if not (isinstance(fps, (int, float)) and 0 < fps <= 1000):
        raise ConfigError(f"fps must be a number in (0, 1000], got {fps!r}")
    video = Path(path)
    if video.suffix.lower() != ".mp4":
        raise ConfigError(f"make_shifted_video writes an .mp4 file (fourcc mp4v); got {str(video)!r}")
    video.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (size, size))
    if not writer.isOpened():
        raise OSError(f"OpenCV could not open {str(video)!r} for writing (fourcc mp4v)")
    instances = np.empty((frames, size, size), np.uint8)
    try:
        for t, (rgb, ids) in enumerate(shifted_frames(frames, shift_at=shift_at, kind=kind, size=size, seed=seed)):
            writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # the writer takes BGR
            instances[t] = ids
    finally:
        writer.release()
    masks = video.with_suffix(".npz")
    np.savez_compressed(
        masks, instances=instances, shift_at=np.int64(shift_at), fps=np.float64(fps), seed=np.int64(seed),
        kind=np.str_(kind), meta=np.str_(json.dumps({"generator": "tta_runtime.data.video", "size": size})),
    )
    return ShiftedVideo(video=video, masks=masks, frames=frames, size=size, fps=float(fps), shift_at=shift_at, kind=kind, seed=seed)


# --------------------------------------------------------------------------------------------------
# Helpers


def _check(frames: object, shift_at: object, kind: object, size: object, seed: object) -> int:
    if not is_int(frames) or int(frames) < 1:  # type: ignore[arg-type]
        raise ConfigError(f"frames must be an int >= 1, got {frames!r}")
    if kind not in SHIFT_KINDS:
        raise ConfigError(unknown_name_message("shift kind", str(kind), list(SHIFT_KINDS)))
    if not is_int(size) or not _MIN_SIZE <= int(size) <= _MAX_SIZE:  # type: ignore[arg-type]
        raise ConfigError(f"size must be an int in [{_MIN_SIZE}, {_MAX_SIZE}] (frame side in px), got {size!r}")
    if not is_int(seed) or int(seed) < 0:  # type: ignore[arg-type]
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    at = int(frames) // 2 if shift_at is None else shift_at  # type: ignore[call-overload]
    if not is_int(at) or not 0 <= int(at) <= int(frames):  # type: ignore[arg-type]
        raise ConfigError(f"shift_at must be an int in [0, frames={frames}] (first shifted frame), got {shift_at!r}")
    return int(at)


def _object_mask(obj: _Object, size: int) -> np.ndarray:
    """(S, S) bool: the object's shape at its current pose, with the scene family's shape formulas."""
    u, v = shape_frame(size, obj.y, obj.x, obj.theta)
    return shape_mask(obj.shape, u, v, obj.radius)


def _moving_texture(obj: _Object, size: int) -> np.ndarray:
    """The object's texture (S, S), shifted with the object so that it does not slide over it."""
    assert obj.texture is not None
    return np.roll(obj.texture, (round(obj.y - obj.y0), round(obj.x - obj.x0)), axis=(0, 1))


def _light_field(size: int) -> np.ndarray:
    """(S, S, 3) float32 gain: 1.1 at the top-left corner to 0.45 at the bottom-right, warm tint."""
    y, x = pixel_grid(size)
    ramp = ((y + x) / (2 * size)).astype(np.float32)  # (S, S) in (0, 1)
    gain = 1.1 - 0.65 * ramp
    return gain[..., None] * np.array([1.0, 0.85, 0.6], np.float32)


def _move(obj: _Object, size: int) -> None:
    """One frame of motion: straight line, elastic bounce off the borders (nominal radius as margin)."""
    obj.y += obj.vy
    obj.x += obj.vx
    lo, hi = obj.radius, size - obj.radius
    if not lo <= obj.y <= hi:
        obj.vy = -obj.vy
        obj.y = min(max(obj.y, lo), hi)
    if not lo <= obj.x <= hi:
        obj.vx = -obj.vx
        obj.x = min(max(obj.x, lo), hi)
    obj.theta += obj.spin
