"""Continual adaptation over a sequence of frames: the model keeps what it learned between frames.

    python examples/continual_stream.py [--frames N] [--steps N]

Frames come from the benchmark scene generator's textured-background shift (`tta_runtime.data.scenes`, a
stand-in for a camera that moved somewhere new); the rest is the public API.
"""

from __future__ import annotations

import argparse

import tta_runtime as tta
from tta_runtime.data.scenes import generate_scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="adaptation steps per frame")
    args = parser.parse_args()

    rt = tta.Runtime.from_pretrained("slot-shapes-32", mode="continual", recipe="slot_tta_fast", steps=args.steps)
    frames, _ = generate_scenes("textured_background", args.frames, seed=3, size=rt.input_size)
    for i, frame in enumerate(frames):
        res = rt.adapt_and_predict(frame)
        rep = res.adaptation
        print(f"frame {i}: OOD {res.ood_score:+.2f}, loss {rep.losses[0]:.5f} -> {rep.final_loss:.5f}")
    rt.reset()  # back to the shipped weights
    print("reset to the shipped weights")


if __name__ == "__main__":
    main()
