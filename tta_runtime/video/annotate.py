"""What a stream writes and compares against: annotated frames, the video writer, ground truth.

`annotate_frame` draws a frame's masks, slot outlines and a few HUD lines; `_open_writer` opens the
mp4v writer at the frames' size; `load_ground_truth` turns per-frame instance maps (an .npz, an array,
a sequence or a callable) into one lookup by source frame index.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from tta_runtime.device import import_cv2
from tta_runtime.errors import InvalidInputError
from tta_runtime.video.sources import StreamError

if TYPE_CHECKING:
    from tta_runtime.result import Result

GroundTruth = Union[str, os.PathLike, np.ndarray, Sequence[np.ndarray], Callable[[int], "np.ndarray | None"]]


def annotate_frame(result: Result, hud: Sequence[str] = (), *, alpha: float = 0.45) -> np.ndarray:
    """The frame with its masks overlaid, slot outlines in white, and `hud` lines top-left.

    Returns (H, W, 3) uint8 RGB at the frame's own size (convert to BGR for cv2.VideoWriter).
    """
    from tta_runtime.visual import overlay_masks

    cv2 = import_cv2()
    out = overlay_masks(result.image, result.masks, alpha=alpha, outlines=True)
    if hud:
        h, w = out.shape[:2]
        scale = max(0.3, min(1.0, w / 400))
        (_, th), base = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        line = th + base + 2
        band = min(h, 3 + line * len(hud))
        out[:band] = (out[:band].astype(np.uint16) * 2 // 5).astype(np.uint8)  # darken behind the text
        for i, text in enumerate(hud):
            cv2.putText(out, text, (3, 2 + th + i * line), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def load_ground_truth(truth: GroundTruth) -> Callable[[int], np.ndarray | None]:
    """Per-frame instance maps as a lookup `index -> (H, W) int map or None`.

    Accepts an ``.npz`` with ``instances`` (N, H, W) (what `make_shifted_video` writes), an (N, H, W)
    array, a sequence of (H, W) maps, or a callable index -> map (None = no truth for that frame).
    Indices are source frame indices (stride and drops do not shift them).
    """
    if callable(truth):
        return truth
    if isinstance(truth, (str, os.PathLike)):
        path = Path(truth)
        if not path.is_file():
            what = "does not exist" if not path.exists() else "is not a regular file"
            raise InvalidInputError(f"ground truth {str(path)!r} {what}; expected an .npz with an 'instances' (N, H, W) array")
        maps = _read_npz(path)
    else:
        maps = truth
    if not isinstance(maps, (np.ndarray, Sequence)) or isinstance(maps, (str, bytes)):
        raise InvalidInputError(
            f"ground truth must be an .npz path, an (N, H, W) array, a sequence of (H, W) maps or a callable, "
            f"got {type(maps).__name__}"
        )
    if isinstance(maps, np.ndarray) and (maps.ndim != 3 or maps.dtype.kind not in "iub"):
        raise InvalidInputError(
            f"ground truth must be (N, H, W) integer instance maps, got shape {maps.shape} dtype {maps.dtype}"
        )
    n = len(maps)

    def lookup(index: int) -> np.ndarray | None:
        return np.asarray(maps[index]) if 0 <= index < n else None

    return lookup


def _read_npz(path: Path) -> np.ndarray:
    """The 'instances' array of an .npz (or the array of an .npy); never unpickles."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            return np.asarray(loaded)
        with loaded as data:
            if "instances" not in data:
                raise InvalidInputError(f"ground truth {str(path)!r} has no 'instances' array (keys: {list(data)})")
            return data["instances"]
    except InvalidInputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InvalidInputError(
            f"cannot read ground truth {str(path)!r}: {e}; expected an .npz with an 'instances' (N, H, W) integer "
            "array (object arrays are refused: they would need unpickling)"
        ) from None


def _open_writer(path: str | os.PathLike[str], fps: float | None, stride: int, shape: tuple[int, ...]) -> Any:
    """cv2.VideoWriter (fourcc mp4v) at the frames' size; at the source's rate divided by the stride."""
    cv2 = import_cv2()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rate = (fps or 25.0) / stride
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), rate, (shape[1], shape[0]))
    if not writer.isOpened():
        raise StreamError(
            f"OpenCV could not open {str(out)!r} for writing with fourcc mp4v; use a writable path ending in "
            ".mp4 (or .avi / .mkv / .mov)"
        )
    return writer
