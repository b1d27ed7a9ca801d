"""The runtime: one request read top to bottom.

image(s) -> prepare (validate, RGB, resize to the card's size) -> model forward (frozen path, OOD score)
-> [adaptation loop: recipe's loss on the input, gradient steps, episodic reset] -> masks mapped back to
the image's own size (segmenters) or class probabilities (classifiers) -> `Result` (one per image).

The model kind comes from the card: a slot segmenter adapts per image (a batch is adapted image by
image); a classifier adapts on the whole batch at once (batch statistics, Tent at batch 64).

Thread safety: a `Runtime` owns one model; every call takes the runtime's lock for its whole duration,
so concurrent calls run one after another and each sees exactly the state it would see alone (in
episodic mode: the loaded weights). For parallel throughput, create one `Runtime` per worker.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta_runtime.adapt.loop import AdaptationReport, Adapter, StepCallback
from tta_runtime.config import AdaptConfig, ModelCard, RuntimeOptions, validate, with_overrides
from tta_runtime.device import resolve_device
from tta_runtime.errors import ConfigError, InvalidInputError, ModelLoadError
from tta_runtime.hub import find_model, load_card, load_optimizer_state, load_recipe, load_weights
from tta_runtime.inputs import PreparedImage, prepare_image, resize_image, resize_masks, split_batch
from tta_runtime.ood import DEFAULT_SCORER, Calibration, OODFeatures, features_from_output, load_calibration
from tta_runtime.prune.ftwt import PRUNE_DIR, build_pruned, load_prune_card
from tta_runtime.registry import unknown_name_message
from tta_runtime.result import Result
from tta_runtime.models.build import build_model
from tta_runtime.models.segmenter import SegmenterOutput, SlotSegmenter, segmentation_masks

log = logging.getLogger(__name__)

OODInfo = tuple[float, str, "bool | None", float]  # (score, scorer, is_ood, recon_mse) of one image
_RUNTIME_KEYS = set(RuntimeOptions.model_fields)
_RECIPE_KEYS = set(AdaptConfig.model_fields)


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = set(overrides) - _RUNTIME_KEYS - _RECIPE_KEYS
    if unknown:
        raise ConfigError(
            f"unknown option(s) {sorted(unknown)}; runtime options: {sorted(_RUNTIME_KEYS)}; "
            f"recipe fields: {sorted(_RECIPE_KEYS - {'name', 'description'})}"
        )
    runtime = {k: v for k, v in overrides.items() if k in _RUNTIME_KEYS}
    recipe = {k: v for k, v in overrides.items() if k not in _RUNTIME_KEYS}
    return runtime, recipe


class Runtime:
    """A loaded model plus its adaptation recipe. Build with `Runtime.from_pretrained`."""

    def __init__(
        self, model: torch.nn.Module, card: ModelCard, *, options: RuntimeOptions | None = None,
        recipe: AdaptConfig | None = None, folder: Path | None = None,
        optimizer_state: dict[str, torch.Tensor] | None = None, fisher: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.options = options or RuntimeOptions()
        self.card = card
        self.folder = folder
        self.device = resolve_device(self.options.device)
        self.model = model.to(self.device).eval()
        recipe = recipe or load_recipe(self.options.recipe)
        if self.options.mode is not None:
            recipe = with_overrides(recipe, {"mode": self.options.mode}, "recipe")
        self.recipe = recipe
        self._adapter = Adapter(self.model, recipe, training_optimizer_state=optimizer_state, fisher=fisher)
        self._lock = threading.RLock()  # re-entrant: an on_step callback may call predict()
        self._adapted_since_reset = 0  # continual mode's reset_every policy counts adapted inputs
        # Continual adaptation has moved the weights away from the loaded ones, which the OOD calibration (and the
        # card's recon statistics) describe: scores then come from a pass with the loaded weights.
        self._weights_moved = False
        self._recent_labels: collections.deque[int] = collections.deque(maxlen=self.options.collapse_window or 1)
        self.calibration = self._load_calibration()
        self._last_pruning: list[dict[str, Any] | None] = []  # per image of the latest frozen forward
        self._ort = None  # the frozen path on ONNX Runtime, when options.backend says so
        if self.options.backend == "onnxruntime" and self.options.prune is not None:
            raise ConfigError("prune= runs on backend='torch' (export a pruned path with `tta-runtime bench prune`)")
        if self.options.backend == "onnxruntime":
            if self.task != "segmentation":
                raise ConfigError("backend='onnxruntime' supports the slot segmenter only for now; use backend='torch'")
            from tta_runtime.deploy.backends import OrtFrozenPath, OrtOptions, providers_for_device

            self._ort = OrtFrozenPath(
                self.model, card, calibration=self.calibration, providers=providers_for_device(self.device),
                options=OrtOptions(intra_op_num_threads=self.options.onnxruntime_threads),
            )

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str] | None = None, **overrides: Any) -> Runtime:
        """Load a model by repository name (None = the default model), folder, card or weights path.

        `overrides` are runtime options (`device`, `max_pixels`, `recipe`, `mode`) or recipe fields
        (`steps`, `lr`, `params`, ...), validated; unknown names raise `ConfigError`.
        """
        runtime_kw, recipe_kw = _split_overrides(overrides)
        options = validate(RuntimeOptions, runtime_kw, "runtime options")
        folder = find_model(name_or_path)
        card = load_card(folder)
        if "recipe" not in runtime_kw:
            options = with_overrides(options, {"recipe": card.default_recipe}, "runtime options")
        recipe = load_recipe(options.recipe, **recipe_kw)
        if options.prune is not None:
            model, state = _pruned_model(folder, card, options.prune)
        else:
            model, state = build_model(card), load_weights(folder, card)
        if card.external is not None:
            from tta_runtime.models.encoders import load_into

            load_into(model, state, str(folder))  # type: ignore[arg-type]
        else:
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise ModelLoadError(f"weights in {folder} do not fit the card's architecture: {e}") from None
        optimizer_state = load_optimizer_state(folder, card)
        fisher = load_weights(folder, card, card.fisher) if card.fisher is not None else None
        return cls(
            model, card, options=options, recipe=recipe, folder=folder, optimizer_state=optimizer_state, fisher=fisher
        )

    @classmethod
    def from_architecture(
        cls, source: str, name: str, *, weights: str | os.PathLike[str], num_classes: int, input_size: int = 224,
        labels: list[str] | None = None, recipe: str = "tent", **overrides: Any,
    ) -> Runtime:
        """A torchvision or timm classifier by name with weights from a local file (nothing downloads).

        `source` "torchvision" | "timm" (each an optional extra; a missing one raises `ConfigError`
        naming it); `weights`: .safetensors, or a state dict read with `torch.load(weights_only=True)`.
        Mismatched keys or shapes raise `ModelLoadError` naming them. `overrides` as in `from_pretrained`.
        """
        from tta_runtime.config import ExternalConfig, Preprocessing, WeightsSpec
        from tta_runtime.models.encoders import build_external, load_into, load_state_dict_file
        from tta_runtime.hub import sha256_file

        ext = validate(ExternalConfig, {"source": source, "name": name, "num_classes": num_classes, "resolution": input_size}, "architecture")
        model = build_external(ext)  # first: a missing extra is the first thing to say
        path = Path(weights)
        state = load_state_dict_file(path)
        card = validate(ModelCard, {
            "name": re.sub(r"[^a-z0-9_.-]", "-", f"{source}-{name}".lower()), "task": "classification",
            "architecture": source, "external": ext, "labels": labels or [],
            "preprocessing": Preprocessing(size=input_size), "weights": WeightsSpec(file=path.name, sha256=sha256_file(path)),
            "default_recipe": recipe,
        }, "model card")
        runtime_kw, recipe_kw = _split_overrides({"recipe": recipe, **overrides})
        options = validate(RuntimeOptions, {"load_calibration": False, **runtime_kw}, "runtime options")
        load_into(model, state, str(path))
        return cls(model, card, options=options, recipe=load_recipe(options.recipe, **recipe_kw), folder=None)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def input_size(self) -> int:
        return self.card.preprocessing.size

    @property
    def task(self) -> str:
        """'segmentation' or 'classification' (from the card)."""
        return self.card.task

    # -- requests ----------------------------------------------------------------------------------
    def predict(self, image: Any, *, channel_order: str = "rgb") -> Result | list[Result]:
        """Predict without adapting: one Result for one image, a list for a batch (see `split_batch`:
        numpy (N, H, W, C), torch (N, C, H, W) with N > 1, a list of images; classifiers also take gray
        numpy (N, H, W)). See `Result` for shapes and ranges."""
        items, is_batch = self._items(image)
        t0 = time.perf_counter()
        prepared = self._prepare(items, channel_order)
        x = torch.cat([p.tensor for p in prepared]).to(self.device)
        t_prep = time.perf_counter() - t0
        with self._lock:
            t1 = time.perf_counter()
            out, oods = self._frozen_path(x)
            t_fwd = time.perf_counter() - t1
        results = self._results(out, prepared, oods, None, {"preprocess_s": t_prep, "forward_s": t_fwd}, x)
        return results if is_batch else results[0]

    def adapt_and_predict(
        self, image: Any, *, channel_order: str = "rgb", on_step: StepCallback | None = None,
        adapt: str | None = None, **overrides: Any,
    ) -> Result | list[Result]:
        """Adapt with the runtime's recipe (fields overridable per call), then predict.

        One image gives one Result, a batch a list (as `predict`). A segmenter adapts to each image of a
        batch in turn; a classifier adapts once on the whole batch (the recipe's loss is a batch loss).
        `adapt` ("always" | "never" | "when_ood", default: the runtime's option) gates the adaptation:
        with "when_ood", inputs the calibrated OOD scorer calls in-distribution take the predict path
        and their report says why no step ran. In episodic mode (default) the model's parameters and
        buffers are bit-exact afterwards; in continual mode the adapted state carries over to the next
        call until `reset()`.
        """
        gate = self._gate(adapt)
        recipe = self._recipe_for(overrides)
        items, is_batch = self._items(image)
        t0 = time.perf_counter()
        prepared = self._prepare(items, channel_order)
        t_prep = time.perf_counter() - t0
        if self.task == "segmentation" and recipe.execution is not None and len(prepared) > 1:
            results = self._adapt_segmenter_batched(prepared, gate, recipe, on_step, t_prep)
        elif self.task == "segmentation":
            results = [self._adapt_segmenter(p, gate, recipe, on_step, t_prep / len(prepared)) for p in prepared]
        else:
            results = self._adapt_classifier(prepared, gate, recipe, on_step, t_prep)
        return results if is_batch else results[0]

    def _adapt_segmenter(
        self, prepared: PreparedImage, gate: str, recipe: AdaptConfig, on_step: StepCallback | None, t_prep: float
    ) -> Result:
        x = prepared.tensor.to(self.device)
        with self._lock:
            t1 = time.perf_counter()
            before, oods = self._frozen_path(x)  # the OOD score is about the input before adaptation
            t_fwd = time.perf_counter() - t1
            skip = self._skip_reason(gate, oods[0])
            if skip is None:
                with self._fixed_masks(x):
                    final, report = self._adapter.run(x, cfg=recipe, on_step=on_step)
                self._count_adapted(report, 1)
            else:
                final, report = before, self._skipped_report(recipe, skip, x)
        result = self._results(final, [prepared], oods, report, {"preprocess_s": t_prep, "forward_s": t_fwd}, x)[0]
        result.timings.update({f"adapt_{k}": v for k, v in report.timings.items()})
        return result

    def _adapt_segmenter_batched(
        self, prepared: list[PreparedImage], gate: str, recipe: AdaptConfig, on_step: StepCallback | None,
        t_prep: float,
    ) -> list[Result]:
        """The recipe's [execution]: the images that pass the gate are adapted all at once, each with its own
        weights (`BatchedAdapter`), in chunks of `execution.batch_size`; the model's weights stay untouched."""
        from tta_runtime.adapt.batched import BatchedAdapter

        if on_step is not None:
            raise ConfigError("on_step is called by the one-image loop; batched execution has no per-step callback: "
                              "drop the recipe's [execution] (or pass execution=None) to watch the steps")
        if self.options.prune is not None:
            raise ConfigError("batched execution does not run pruned variants yet; load without prune= or drop the "
                              "recipe's [execution]")
        x = torch.cat([p.tensor for p in prepared]).to(self.device)  # prepared tensors share the model's size
        with self._lock:
            before, oods, t_fwd, reasons, chosen = self._gated_frozen_path(x, gate)
            reports: list[AdaptationReport | None] = [None] * len(prepared)
            fields = [f.name for f in dataclasses.fields(SegmenterOutput)]
            merged = {f: getattr(before, f).clone() for f in fields}
            if chosen:
                batched = BatchedAdapter(
                    self.model, recipe, execution=recipe.execution,
                    training_optimizer_state=self._adapter.training_optimizer_state,
                )
                out, reps = batched.run(x[chosen])
                for j, i in enumerate(chosen):
                    for f in fields:
                        merged[f][i] = getattr(out, f)[j].to(merged[f].dtype)
                    reports[i] = reps[j]
        final = SegmenterOutput(**merged)
        results = []
        for i, p in enumerate(prepared):
            report = reports[i] or self._skipped_report(recipe, reasons[i] or "", x[i : i + 1])
            timings = {"preprocess_s": t_prep / len(prepared), "forward_s": t_fwd / len(prepared)}
            res = self._results(_slice_output(final, i), [p], [oods[i]], report, timings, x[i : i + 1])[0]
            res.timings.update({f"adapt_{k}": v for k, v in report.timings.items()})
            results.append(res)
        return results

    def _gated_frozen_path(
        self, x: torch.Tensor, gate: str
    ) -> tuple[Any, list[OODInfo], float, list[str | None], list[int]]:
        """The frozen forward of a batch (call under the lock): output, OOD info, seconds, and per image why
        it is not adapted (None = adapt), with the indices that are."""
        t1 = time.perf_counter()
        before, oods = self._frozen_path(x)
        t_fwd = time.perf_counter() - t1
        reasons = [self._skip_reason(gate, o) for o in oods]
        return before, oods, t_fwd, reasons, [i for i, r in enumerate(reasons) if r is None]

    def _adapt_classifier(
        self, prepared: list[PreparedImage], gate: str, recipe: AdaptConfig, on_step: StepCallback | None,
        t_prep: float,
    ) -> list[Result]:
        """One adaptation on the batch's images that pass the gate; the others keep the frozen prediction."""
        x = torch.cat([p.tensor for p in prepared]).to(self.device)
        with self._lock:
            before, oods, t_fwd, reasons, chosen = self._gated_frozen_path(x, gate)
            logits = before.logits.clone()
            if chosen:
                with self._fixed_masks(x[chosen]):
                    final, report = self._adapter.run(x[chosen], cfg=recipe, on_step=on_step)
                logits[chosen] = final.logits
                self._count_adapted(report, len(chosen), final.logits.argmax(dim=1).tolist())
            else:
                report = self._skipped_report(recipe, reasons[0] or "", x)
        timings = {"preprocess_s": t_prep, "forward_s": t_fwd, **{f"adapt_{k}": v for k, v in report.timings.items()}}
        results = self._classifier_results(logits, prepared, oods, report, timings)
        for i, r in enumerate(reasons):
            if r is not None and chosen:  # adapted batch, but this image was in distribution: say so
                results[i].adaptation = self._skipped_report(recipe, r, x)
        return results

    @property
    def backend(self) -> str:
        """'onnxruntime' or 'torch': what runs the frozen path (adaptation always runs in PyTorch)."""
        return "onnxruntime" if self._ort is not None else "torch"

    def export(self, path: str | os.PathLike[str] | None = None, *, format: str = "onnx", part: str = "predictor", **options: Any) -> Any:
        """Export the frozen path with the model's current weights (adapted ones after continual adaptation).

        `format` "onnx" | "tensorrt"; `part` "encoder" | "predictor" | "predictor_ood"; `options`: half,
        dynamic, opset, batch, device, workspace (see `tta_runtime.export.export`). Returns an
        `ExportResult` (paths, manifest with the tolerances met).
        """
        from tta_runtime.deploy.export import export

        with self._lock:
            return export(self.model, self.card, format, path, part=part, calibration=self.calibration, **options)

    def stream(self, source: Any, **options: Any) -> Any:
        """Per-frame Results over a video file, webcam index, URL or iterable of frames (see `tta_runtime.video.stream`)."""
        from tta_runtime.video import stream

        return stream(self, source, **options)

    def reset(self) -> None:
        """Back to the loaded weights (continual mode); a no-op in effect for episodic use."""
        with self._lock:
            self._adapter.reset()
            self._adapted_since_reset = 0
            self._weights_moved = False

    def _count_adapted(self, report: AdaptationReport, n: int, labels: list[int] | None = None) -> None:
        """Continual mode's reset policy: `reset_every` adapted inputs, the collapse monitor (classifiers:
        the predicted labels of the last `collapse_window` inputs have too little entropy), and a method's
        own signal (SAR)."""
        if report.mode != "continual":
            return
        if report.reset:
            self._adapted_since_reset = 0
            self._recent_labels.clear()
            self._weights_moved = False
            return
        self._weights_moved = self._weights_moved or report.steps_run > 0
        self._adapted_since_reset += n
        every = self.options.reset_every
        why = None
        if every is not None and self._adapted_since_reset >= every:
            why = f"reset_every={every}"
        window = self.options.collapse_window
        if window is not None and labels:
            self._recent_labels.extend(labels)
            if len(self._recent_labels) == window:
                counts = np.bincount(np.fromiter(self._recent_labels, dtype=np.int64))
                p = counts[counts > 0] / window
                ent = float(-(p * np.log(p)).sum())
                limit = self.options.collapse_entropy * math.log(max(self._adapter._context.num_classes, 2))
                if ent < limit:
                    why = f"collapse: label entropy {ent:.2f} < {limit:.2f} over the last {window} inputs"
        if why is not None:
            log.info("continual reset (%s)", why)
            self._adapter.reset()
            self._adapted_since_reset = 0
            self._recent_labels.clear()
            self._weights_moved = False
            report.reset = True

    # -- helpers -----------------------------------------------------------------------------------
    def _recipe_for(self, overrides: dict[str, Any]) -> AdaptConfig:
        if not overrides:
            return self.recipe
        overrides = dict(overrides)
        base = self.recipe
        if "recipe" in overrides:
            base = load_recipe(overrides.pop("recipe"))
            if self.options.mode is not None:  # the runtime's mode outlives a per-call recipe switch
                overrides.setdefault("mode", self.options.mode)
        unknown = set(overrides) - _RECIPE_KEYS
        if unknown:
            raise ConfigError(f"unknown adaptation option(s) {sorted(unknown)}; recipe fields: {sorted(_RECIPE_KEYS)}")
        return with_overrides(base, overrides, "recipe")

    def _load_calibration(self) -> Calibration | None:
        """The calibrated OOD scorer from `<model folder>/ood/`, if the folder has one."""
        if not self.options.load_calibration:
            return None
        folder = self.folder
        if folder is not None and self.options.prune is not None:
            folder = folder / PRUNE_DIR / self.options.prune  # a pruned model's scores need their own calibration
        has = folder is not None and (folder / "ood").is_dir()
        if not has:
            if self.options.adapt == "when_ood" or self.options.ood_scorer is not None:
                load_calibration(folder or Path("."))  # raises, saying how to fit one
            return None
        cals = load_calibration(folder)  # type: ignore[arg-type]
        name = self.options.ood_scorer or (DEFAULT_SCORER if DEFAULT_SCORER in cals else sorted(cals)[0])
        if name not in cals:
            raise ConfigError(unknown_name_message("calibrated OOD scorer", name, list(cals)))
        return cals[name]

    def _fixed_masks(self, x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
        """A pruned model decides its masks on the adaptation loop's first forward of `x` (the recipe's
        normalisation, before any update) and every later step reuses them."""
        fixed = getattr(self.model, "fixed_masks", None)
        return fixed() if fixed is not None else contextlib.nullcontext()

    def _pruning_info(self, n: int) -> list[dict[str, Any] | None]:
        """Per image of the latest forward of a pruned model: kept share per unit and the conv-MACs fraction."""
        if self.options.prune is None or not getattr(self.model, "last_masks", None):
            return [None] * n
        kept = self.model.kept()  # type: ignore[operator]
        widths = torch.tensor([m.shape[1] for m in self.model.last_masks], dtype=torch.float64)  # type: ignore[union-attr]
        macs = self.model.macs_fraction()  # type: ignore[operator]
        if kept.shape[0] != n:  # a batch-level mask union (never for the frozen path): report it for each image
            kept, macs = kept.expand(n, -1), macs.expand(n)
        return [{"variant": self.options.prune, "kept_fraction": [round(float(v), 4) for v in kept[i] / widths],
                 "macs_fraction": round(float(macs[i]), 4)} for i in range(n)]

    def _pruning_of(self, i: int) -> dict[str, Any] | None:
        return self._last_pruning[i] if i < len(self._last_pruning) else None

    def _gate(self, adapt: str | None) -> str:
        gate = adapt or self.options.adapt
        if gate not in ("always", "never", "when_ood"):
            raise ConfigError(f"adapt must be 'always', 'never' or 'when_ood', got {gate!r}")
        if gate == "when_ood" and self.calibration is None:
            load_calibration(self.folder or Path("."))  # raises, saying how to fit one
        return gate

    def _frozen_path(self, x: torch.Tensor) -> tuple[Any, list[OODInfo]]:
        """Forward pass without gradients, and (ood_score, scorer, is_ood, recon_mse) per image.

        The output comes from the current weights. The scores describe the input, not the adaptation
        history: once continual adaptation has moved the weights, they come from a second pass with the
        loaded weights (the ones the calibration was fitted for), so the same input always scores the same."""
        embedding = self.calibration.embedding if self.calibration else "encoder"
        if self._ort is not None:
            out, oods = self._ort(x)
            if not self._weights_moved:
                return out, oods
            feats = self._loaded_weights_features(x, embedding)
        else:
            with torch.inference_mode():
                out, feats = _FeaturePass(self.model, self.task, embedding)(x)
            self._last_pruning = self._pruning_info(x.shape[0])
            if self._weights_moved:
                feats = self._loaded_weights_features(x, embedding)
        return out, self._ood_infos(feats)

    def _loaded_weights_features(self, x: torch.Tensor, embedding: str) -> OODFeatures:
        """The OOD features of a forward pass with the loaded weights (the model's own are left alone)."""
        with torch.inference_mode():
            return torch.func.functional_call(
                _FeaturePass(self.model, self.task, embedding), {f"model.{k}": v for k, v in self._adapter._source.items()},
                (x,), strict=True,
            )[1]

    def _ood_infos(self, feats: OODFeatures) -> list[OODInfo]:
        cal = self.calibration
        n = len(feats)
        mse = feats.recon_mse.float().cpu().numpy() if feats.recon_mse is not None else np.full(n, np.nan)
        if cal is not None:
            scores = cal.score(feats)
            return [(float(sc), cal.scorer, bool(sc > cal.threshold), float(m)) for sc, m in zip(scores, mse)]
        if self.task == "classification":  # energy (Liu et al. 2020), uncalibrated
            energy = (-torch.logsumexp(feats.logits.float(), dim=1)).cpu().numpy()
            return [(float(e), "energy", None, float("nan")) for e in energy]
        stats = self.card.ood
        if stats is None:
            return [(float(m), "recon_mse", None, float(m)) for m in mse]
        return [(float((m - stats.recon_mse_mean) / stats.recon_mse_std), "recon_mse_z", None, float(m)) for m in mse]

    def _items(self, image: Any) -> tuple[list[Any], bool]:
        batch = split_batch(image, gray_batches=self.task == "classification")
        return (batch, True) if batch is not None else ([image], False)

    def _prepare(self, items: list[Any], channel_order: str) -> list[PreparedImage]:
        prepared = []
        for i, item in enumerate(items):
            try:
                prepared.append(prepare_image(
                    item, size=self.input_size, channel_order=channel_order, max_pixels=self.options.max_pixels
                ))
            except InvalidInputError as e:
                if len(items) == 1:
                    raise
                raise InvalidInputError(f"image {i} of the batch of {len(items)}: {e}") from None
        return prepared

    def _skip_reason(self, gate: str, ood: OODInfo) -> str | None:
        if gate == "never":
            return "adapt='never'"
        if gate == "when_ood" and not ood[2]:
            return f"in distribution ({ood[1]} {ood[0]:.3g} <= threshold {self.calibration.threshold:.3g})"  # type: ignore[union-attr]
        return None

    def _skipped_report(self, recipe: AdaptConfig, why: str, x: torch.Tensor) -> AdaptationReport:
        return AdaptationReport(
            recipe=recipe.name, method=recipe.method, mode=recipe.mode, params=recipe.params, params_adapted=0,
            steps_requested=recipe.steps, device=str(x.device), skipped=why, timings={"total_s": 0.0},
        )

    def _results(
        self, out: Any, prepared: list[PreparedImage], oods: list[OODInfo], report: AdaptationReport | None,
        timings: dict[str, float], x: torch.Tensor,
    ) -> list[Result]:
        if self.task == "classification":
            return self._classifier_results(out.logits, prepared, oods, report, timings)
        s = self.input_size
        with torch.no_grad():  # each result's own reconstruction error (after adaptation, if any)
            mses = ((out.reconstruction - x.flatten(2).transpose(1, 2)) ** 2).mean(dim=(1, 2)).float().cpu().numpy()
        results = []
        for i, p in enumerate(prepared):
            h, w = p.original_size
            masks = segmentation_masks(self.model.cfg, out)[i].detach().float().cpu().numpy().reshape(-1, s, s)  # (K, S, S)
            recon = out.reconstruction[i].detach().float().cpu().numpy().reshape(s, s, 3)
            masks = resize_masks(masks, (h, w)) if (h, w) != (s, s) else masks
            recon = resize_image(recon, (h, w)) if (h, w) != (s, s) else recon
            score, scorer, is_ood, _ = oods[i]
            results.append(Result(
                masks=masks.astype(np.float32, copy=False),
                segmentation=masks.argmax(0).astype(np.int64),
                reconstruction=np.clip(recon, 0.0, 1.0).astype(np.float32, copy=False),
                ood_score=float(score), ood_scorer=scorer, recon_mse=float(mses[i]), is_ood=is_ood,
                image=p.original_rgb, model=self.name, device=str(self.device), backend=self.backend, adaptation=report,
                timings=dict(timings), task="segmentation", pruning=self._pruning_of(i),
            ))
        return results

    def _classifier_results(
        self, logits: torch.Tensor, prepared: list[PreparedImage], oods: list[OODInfo],
        report: AdaptationReport | None, timings: dict[str, float],
    ) -> list[Result]:
        logits_np = logits.detach().float().cpu().numpy()  # (B, C)
        probs = torch.softmax(logits.detach().float(), dim=1).cpu().numpy()
        names = self.card.labels
        results = []
        for i, p in enumerate(prepared):
            label = int(probs[i].argmax())
            score, scorer, is_ood, _ = oods[i]
            results.append(Result(
                logits=logits_np[i].copy(), probs=probs[i].copy(), label=label,
                label_name=names[label] if names else "", task="classification",
                ood_score=float(score), ood_scorer=scorer, is_ood=is_ood, image=p.original_rgb, model=self.name,
                device=str(self.device), backend="torch", adaptation=report, timings=dict(timings),
                pruning=self._pruning_of(i),
            ))
        return results


class _FeaturePass(torch.nn.Module):
    """One frozen forward pass: (output, OOD features). A module so that `torch.func.functional_call` can also
    run it with other weights than the model's own (`Runtime._loaded_weights_features`)."""

    def __init__(self, model: torch.nn.Module, task: str, embedding: str) -> None:
        super().__init__()
        self.model, self.task, self.embedding = model, task, embedding

    def forward(self, x: torch.Tensor) -> tuple[Any, OODFeatures]:
        if self.task == "classification":
            out = self.model(x)
            return out, OODFeatures(logits=out.logits, embedding=out.features)
        encoded = self.model.encode(x)
        out = self.model.forward_features(encoded)
        return out, features_from_output(self.model, x, out, encoded=encoded, embedding=self.embedding)  # type: ignore[arg-type]


def _slice_output(out: SegmenterOutput, i: int) -> SegmenterOutput:
    """Image `i` of a batched segmenter output, as a batch of one."""
    return SegmenterOutput(**{f.name: getattr(out, f.name)[i : i + 1] for f in dataclasses.fields(SegmenterOutput)})


def _pruned_model(folder: Path, card: ModelCard, name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The pruned variant `name` of the model in `folder`: its module and checked state dict."""
    prune = load_prune_card(folder, name)
    if prune.base_sha256 != card.weights.sha256:
        raise ModelLoadError(
            f"pruned variant {name!r} was made from other weights of {card.name!r} (sha256 {prune.base_sha256[:12]}..., "
            f"the card has {card.weights.sha256[:12]}...); retrain it with `tta-runtime prune train`"
        )
    model = build_pruned(card, prune)
    state = load_weights(folder / PRUNE_DIR / name, card, prune.weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"weights of pruned variant {name!r} do not fit {card.name!r}: {e}") from None
    return model, state
