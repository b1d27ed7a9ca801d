"""`tta-runtime bench overhead`: the runtime beside the reference loops it wraps, in one run, as ratios.

Every section times the reference and the runtime's public API on the same model and inputs, interleaved
(A B A B ...: drift hits both alike), on `threads` intra-op threads, and reports ratios of medians:

- **tent** (digits-cnn-bn, batch 64 and 1): Tent's own loop (one forward with the recipe's BatchNorm statistics,
  entropy, backward, Adam on the norm affine parameters, that forward's outputs as the prediction, reset by
  `load_state_dict`) against `Runtime(recipe="tent").adapt_and_predict(batch)` as shipped (Tent's semantics,
  `prediction="last_forward"`, and the default OOD score, whose scorer reads the first convolution only), with
  the reference's work (`score_ood=False`), and predicting after the update (`prediction="adapted"`);
- **bn_stats**: one forward with the recipe's statistics against the `bn_stats` recipe;
- **slot_tta_fast** (`slot-shapes-32`, the bundled sample): the recipe's loop written out (encoder once,
  60 steps on 25% of the pixels, Adam with warm-up and cosine decay, one full forward, reset) against the runtime;
- **frozen_segmenter** (the default segmenter, its demo sample): `predict` at batch 1 with today's decoder against the eager implementation it replaced
  (`eager_decoder()`), with the largest output difference, in a fresh process and (with the Tent section) again
  in this one after its batch-64 work, where the eager decoder's large temporaries no longer fault in new pages;
- **pruning**: dense against `prune=` variants through `predict` (batch 1 and 64), with test accuracy (the digits CNN,
  and `slot-shapes-32`, the segmenter with a pruned variant);
- **busy_core**: adapting the default model's demo sample with the library's defaults, idle and beside a process that keeps
  one core busy (a fresh process, so nothing here sets its threads), against the same with one thread per core.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tta_runtime.evaluation.timing import interleaved_latency

__all__ = ["bench_overhead", "busy_core_child", "frozen_segmenter_child"]

Progress = Callable[[str], None]
SMALL_SEGMENTER = "slot-shapes-32"  # the segmenter with a pruned variant and the recipe `slot_tta_fast` was made for


def _ratios(times: dict[str, float], reference: str) -> dict[str, Any]:
    return {"median_ms": {k: round(v * 1e3, 3) for k, v in times.items()},
            "ratio_to_reference": {k: round(v / times[reference], 3) for k, v in times.items() if k != reference}}


def _trainable_copy(rt: Any, spec: str) -> tuple[torch.nn.Module, list[torch.nn.Parameter], dict[str, torch.Tensor]]:
    """A copy of `rt`'s model with only the parameters `spec` selects trainable, and its state for the reset."""
    from tta_runtime.adapt.loop import select_parameters

    model = copy.deepcopy(rt.model)
    chosen = select_parameters(model, spec)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in chosen.values():
        p.requires_grad_(True)
    return model, list(chosen.values()), copy.deepcopy(model.state_dict())


def _tent_section(batches: tuple[int, ...], calls: int, note: Progress, threads: int) -> dict[str, Any]:
    import tta_runtime
    from tta_runtime.adapt.methods.base import entropy
    from tta_runtime.data.digits import corrupt, load_digits
    from tta_runtime.models.classifier import images_to_tensor, set_norm_mode

    load = lambda **kw: tta_runtime.Runtime.from_pretrained("digits-cnn-bn", threads=threads, **kw)  # noqa: E731
    shipped, lean = load(recipe="tent"), load(recipe="tent", prediction="last_forward", score_ood=False)
    repredict = load(recipe="tent", prediction="adapted")
    bn_rt, bn_lean = load(recipe="bn_stats"), load(recipe="bn_stats", score_ood=False)
    cfg = shipped.recipe
    model, params, state0 = _trainable_copy(shipped, "norm")
    images = corrupt(load_digits("test")[0][:64], "gaussian_noise", 3, seed=0)
    out: dict[str, Any] = {"recipe": cfg.name, "norm_stats": cfg.norm_stats, "norm_prior": cfg.norm_prior, "lr": cfg.lr}
    for b in batches:
        note(f"tent, batch {b}")
        batch = images[:b]
        arg = batch if b > 1 else batch[0]
        x = images_to_tensor(batch)

        def reference() -> torch.Tensor:
            set_norm_mode(model, cfg.norm_stats, cfg.norm_prior)
            opt = torch.optim.Adam(params, lr=cfg.lr)
            logits = model(x).logits
            loss = entropy(logits).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.load_state_dict(state0)
            set_norm_mode(model, "source")
            return logits.detach()

        def bn_reference() -> torch.Tensor:
            set_norm_mode(model, bn_rt.recipe.norm_stats, bn_rt.recipe.norm_prior)
            with torch.no_grad():
                logits = model(x).logits
            set_norm_mode(model, "source")
            return logits

        ref_pred = reference().argmax(1)
        lean_pred = torch.tensor([r.label for r in (lean.adapt_and_predict(batch) if b > 1 else [lean.adapt_and_predict(batch[0])])])
        times = interleaved_latency({
            "reference": reference,
            "runtime": lambda: shipped.adapt_and_predict(arg),
            "runtime_no_ood": lambda: lean.adapt_and_predict(arg),
            "runtime_adapted_prediction": lambda: repredict.adapt_and_predict(arg),
        }, calls=calls, warmup=max(3, calls // 10))
        bn_times = interleaved_latency({
            "reference": bn_reference,
            "runtime": lambda: bn_rt.adapt_and_predict(arg),
            "runtime_no_ood": lambda: bn_lean.adapt_and_predict(arg),
        }, calls=calls, warmup=max(3, calls // 10))
        out[f"batch_{b}"] = {
            **_ratios(times, "reference"),
            "same_labels_as_reference": bool((ref_pred == lean_pred).all()),
            "bn_stats": _ratios(bn_times, "reference"),
        }
    return out


def _slot_section(calls: int, note: Progress, threads: int) -> dict[str, Any]:
    import tta_runtime
    from tta_runtime.adapt.loop import lr_at
    from tta_runtime.hub import sample_image_path
    from tta_runtime.models.segmenter import image_targets

    note("slot_tta_fast")
    rt = tta_runtime.Runtime.from_pretrained(SMALL_SEGMENTER, recipe="slot_tta_fast", threads=threads)
    cfg = rt.recipe
    image = sample_image_path()
    x = rt._prepare([image], "rgb")[0].tensor  # the same model-size tensor the runtime adapts on
    model, params, state0 = _trainable_copy(rt, cfg.params)
    n_pix = x.shape[-1] * x.shape[-2]
    n_sub = max(1, round(n_pix * cfg.pixel_fraction))

    def reference() -> Any:
        opt = torch.optim.Adam(params, lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            feats = model.encode(x)
        for step in range(cfg.steps):
            idx = torch.randperm(n_pix, generator=gen)[:n_sub]
            out = model.forward_features(feats, idx)
            loss = torch.nn.functional.mse_loss(out.reconstruction, image_targets(x, idx))
            opt.zero_grad()
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            opt.step()
        with torch.no_grad():
            final = model.forward_features(feats)
        model.load_state_dict(state0)
        return final

    times = interleaved_latency({"reference": reference, "runtime": lambda: rt.adapt_and_predict(image)}, calls=calls, warmup=1)
    return {"recipe": cfg.name, "steps": cfg.steps, "pixel_fraction": cfg.pixel_fraction, **_ratios(times, "reference")}


def _frozen_segmenter_section(calls: int, note: Progress, threads: int) -> dict[str, Any]:
    import tta_runtime
    from tta_runtime.hub import sample_image_path
    from tta_runtime.models.segmenter import eager_decoder

    note("frozen segmenter")
    rt = tta_runtime.Runtime.from_pretrained(threads=threads)
    image = np.asarray(rt.predict(sample_image_path(rt.name)).image)

    def eager() -> Any:
        with eager_decoder():
            return rt.predict(image)

    a, b = eager(), rt.predict(image)
    times = interleaved_latency({"eager_reference": eager, "runtime": lambda: rt.predict(image)}, calls=calls, warmup=10)
    x = rt._prepare([image], "rgb")[0].tensor
    with torch.inference_mode():
        new = rt.model(x)
        with eager_decoder():
            old = rt.model(x)
    diff = {k: float((getattr(new, k) - getattr(old, k)).abs().max()) for k in ("masks", "reconstruction", "rgb", "logits")}
    return {"model": rt.name, "backend": rt.backend, "batch": 1, **_ratios(times, "eager_reference"),
            "max_abs_diff": diff, "same_segmentation": bool((a.segmentation == b.segmentation).all())}


def frozen_segmenter_child(calls: int, threads: int) -> dict[str, Any]:
    """`_frozen_segmenter_section` in a fresh process (a process that only segments, as a user's would)."""
    torch.set_num_threads(threads)
    return _frozen_segmenter_section(calls, lambda _m: None, threads)


def _child(code: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", f"import json; from tta_runtime.evaluation.bench_overhead import *; "
                           f"print(json.dumps({code}))"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the benchmark's child process ({code}) failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pruning_section(calls: int, note: Progress, threads: int) -> dict[str, Any]:
    import tta_runtime
    from tta_runtime.data.digits import load_digits
    from tta_runtime.hub import sample_image_path

    out: dict[str, Any] = {}
    test_x, test_y = load_digits("test")
    dense, pruned = (tta_runtime.Runtime.from_pretrained("digits-cnn-bn", prune=p, threads=threads)
                     for p in (None, "r0.6"))
    acc = {name: float(np.mean([r.label for r in rt.predict(test_x)] == test_y)) for name, rt in (("dense", dense), ("r0.6", pruned))}
    out["digits-cnn-bn"] = {"variant": "r0.6", "test_accuracy": acc, "n_test": len(test_y)}
    for b in (1, 64):
        note(f"pruning, digits batch {b}")
        arg = test_x[0] if b == 1 else test_x[:b]
        times = interleaved_latency({"dense": lambda: dense.predict(arg), "r0.6": lambda: pruned.predict(arg)}, calls=calls, warmup=10)
        out["digits-cnn-bn"][f"batch_{b}"] = _ratios(times, "dense")
    out["digits-cnn-bn"]["path"] = (pruned.predict(test_x[0]).pruning or {}).get("path")
    note("pruning, segmenter")
    seg_dense, seg_pruned = (tta_runtime.Runtime.from_pretrained(SMALL_SEGMENTER, prune=p, threads=threads) for p in (None, "r0.8"))
    image = sample_image_path()
    times = interleaved_latency({"dense": lambda: seg_dense.predict(image), "r0.8": lambda: seg_pruned.predict(image)},
                                calls=max(10, calls // 3), warmup=5)
    out["slot-shapes-32"] = {"variant": "r0.8", "batch_1": _ratios(times, "dense"),
                             "path": (seg_pruned.predict(image).pruning or {}).get("path")}
    return out


def busy_core_child(rounds: int, threads: int | None) -> dict[str, Any]:
    """In a fresh process: adapt the bundled sample with the library's defaults (or `threads`), alternating idle
    runs with runs beside a process spinning on one core; medians and their ratio."""
    import tta_runtime
    from tta_runtime.hub import sample_image_path

    rt = tta_runtime.Runtime.from_pretrained(**({} if threads is None else {"threads": threads}))
    image = sample_image_path(rt.name)  # the default model's own demo sample
    rt.adapt_and_predict(image, steps=5)  # warm-up
    seen: list[int] = []
    rt.adapt_and_predict(image, steps=1, on_step=lambda _i, _o: seen.append(torch.get_num_threads()))

    def once() -> float:
        t = time.perf_counter()
        rt.adapt_and_predict(image)
        return time.perf_counter() - t

    idle, busy = [], []
    for _ in range(rounds):
        idle.append(once())
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.3)
            busy.append(once())
        finally:
            spin.kill()
            spin.wait()
    return {"threads_option": threads, "threads_used": seen[0], "idle_s": [round(v, 3) for v in idle],
            "busy_s": [round(v, 3) for v in busy],
            "ratio_busy_to_idle": round(statistics.median(busy) / statistics.median(idle), 3)}


def _busy_section(rounds: int, note: Progress) -> dict[str, Any]:
    from tta_runtime.threads import usable_cores

    out: dict[str, Any] = {"cores": usable_cores()}
    for label, threads in (("library_defaults", None), ("one_thread_per_core", usable_cores())):
        note(f"busy core: {label}")
        out[label] = _child(f"busy_core_child({rounds}, {threads!r})")
    return out


SECTIONS = ("tent", "slot_tta_fast", "frozen_segmenter", "pruning", "busy_core")


def bench_overhead(*, sections: tuple[str, ...] = SECTIONS, calls: int = 30, slot_calls: int = 15, busy_rounds: int = 4,
                   threads: int = 1, progress: Progress | None = None) -> dict[str, Any]:
    """Run the chosen sections (see the module's docstring); the process's threads are `threads` for all but busy_core."""
    from tta_runtime.evaluation.common import hardware

    note = progress or (lambda _m: None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    report: dict[str, Any] = {"benchmark": "overhead", "threads": threads, "calls": calls, "machine": hardware(torch.device("cpu"))}
    t0 = time.perf_counter()
    try:
        if "tent" in sections:
            report["tent"] = _tent_section((64, 1), calls, note, threads)
        if "slot_tta_fast" in sections:
            report["slot_tta_fast"] = _slot_section(slot_calls, note, threads)
        if "frozen_segmenter" in sections:
            # The eager decoder's time depends on the allocator: its multi-MB temporaries fault in fresh pages
            # in a process that has not yet held larger ones. Both cases, labelled.
            note("frozen segmenter (fresh process)")
            report["frozen_segmenter"] = _child(f"frozen_segmenter_child({calls * 3}, {threads})")
            report["frozen_segmenter"]["process"] = "fresh (only this section)"
            if "tent" in sections:
                warm = _frozen_segmenter_section(calls * 3, note, threads)
                report["frozen_segmenter"]["after_batch64_work"] = {k: warm[k] for k in ("median_ms", "ratio_to_reference")}
        if "pruning" in sections:
            report["pruning"] = _pruning_section(calls * 3, note, threads)
    finally:
        torch.set_num_threads(before)
    if "busy_core" in sections:
        report["busy_core"] = _busy_section(busy_rounds, note)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report
