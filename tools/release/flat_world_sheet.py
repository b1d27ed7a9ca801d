"""Contact sheet of the flat world: one row per split, eight scenes each (validation seed), 64x64 shown at 2x.

    python tools/release/flat_world_sheet.py docs/img/flat_world.png
"""

from __future__ import annotations

import sys

import numpy as np

from tta_runtime.data.flat_world import FLAT_SPLITS
from tta_runtime.data.scenes import VAL_SEED, generate_scenes
from tta_runtime.visual import panel, save_png


def sheet(n: int = 8, size: int = 64) -> np.ndarray:
    rows = []
    for split in FLAT_SPLITS:
        images, _ = generate_scenes(split, n, seed=VAL_SEED, size=size)
        tiles = [(split if i == 0 else "", img) for i, img in enumerate(images)]
        rows.append(panel(tiles, scale=2))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])


if __name__ == "__main__":
    print(save_png(sys.argv[1] if len(sys.argv) > 1 else "flat_world.png", sheet()))
