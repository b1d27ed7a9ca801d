"""Benchmark data, generated or bundled (nothing is downloaded); the runtime path never imports it.

Import the modules directly: `scenes` (procedural multi-object scenes and their OOD splits), `video`
(a moving scene with a shift mid-stream), `digits` (scikit-learn's digits, splits and corruption stream)
with `corruptions` (the CIFAR-10-C-style suite); `drawing`, `textures` and `common` are their shared
shapes, colours, textures and argument checks.
"""
