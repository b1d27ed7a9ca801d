"""The runtime: one request read top to bottom.

image(s) -> prepare (validate, RGB, resize to the card's size) -> model forward (frozen path, OOD score)
-> [adaptation loop: recipe's loss on the input, gradient steps, episodic reset] -> masks mapped back to
the image's own size (segmenters) or class probabilities (classifiers) -> `Result` (one per image).

The model kind comes from the card: a slot segmenter adapts per image (a batch is adapted image by
image); a classifier adapts on the whole batch at once (batch statistics, Tent at batch 64). Batches of any
length run in chunks (`PREDICT_CHUNK`, `CLASSIFIER_ADAPT_CHUNK`): working memory does not grow with the batch.

Thread safety: a `Runtime` owns one model; every call takes the runtime's lock for its whole duration,
so concurrent calls run one after another and each sees exactly the state it would see alone (in
episodic mode: the loaded weights). For parallel throughput, create one `Runtime` per worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from tta_runtime.adapt.loop import AdaptationReport, Adapter, StepCallback, check_step_callback, skipped_report
from tta_runtime.adapt.reset import ContinualPolicy
from tta_runtime.config import AdaptConfig, ModelCard, check_keywords, keywords_of, validate, with_overrides
from tta_runtime.options import RuntimeOptions, split_overrides
from tta_runtime.calibration_run import folder_calibrations
from tta_runtime.custom import check_trust, folder_model, folder_recipe
from tta_runtime.device import resolve_device
from tta_runtime.errors import ConfigError
from tta_runtime.hub import find_model, load_card, load_optimizer_state, load_recipe, load_weights, refuse_non_finite
from tta_runtime.frozen import NO_SCORE, FeaturePass, OODScore, features_with, needs_stem, ood_scores, warn_far_ood
from tta_runtime.inputs import PreparedImage, prepare_images, split_batch
from tta_runtime.ood import load_calibration
from tta_runtime.outputs import ResultContext, classifier_results, merge_rows, pruning_info, segmenter_results
from tta_runtime.result import Result
from tta_runtime.threads import ThreadPolicy

log = logging.getLogger(__name__)

PREDICT_CHUNK = 32
"""Images per forward pass (predict, the OOD gate, per-image adaptation): working memory does not grow with the batch."""
CLASSIFIER_ADAPT_CHUNK = 256
"""A classifier's adaptation batch (batch statistics): a longer batch is adapted as consecutive chunks of this many
(episodic: each from the loaded weights; continual: each from the state the last one left)."""
_REENTRANT = ("{what} from inside an on_step callback: the runtime is in the middle of adapting (its weights are "
              "the loop's); re-entrant adaptation and resets are refused and the call's weights are restored. "
              "Call predict() inside on_step, or {what} after adapt_and_predict returns")

_RECIPE_KEYS = set(AdaptConfig.model_fields)


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
        refuse_non_finite({**self.model.state_dict(), **(optimizer_state or {}), **(fisher or {})}, folder or card.name)
        recipe = recipe or load_recipe(self.options.recipe)
        if self.options.mode is not None:
            recipe = with_overrides(recipe, {"mode": self.options.mode}, "recipe")
        self.recipe = recipe
        self._adapter = Adapter(self.model, recipe, training_optimizer_state=optimizer_state, fisher=fisher)
        self._fisher = fisher
        self._lock = threading.RLock()  # re-entrant: an on_step callback may call predict()
        self._adapting = False  # inside the adaptation loop (under the lock): adapt_and_predict / reset refused
        # Continual adaptation has moved the weights away from the loaded ones, which the OOD calibration (and the
        # card's recon statistics) describe: scores then come from a pass with the loaded weights.
        self._weights_moved = False
        self._policy = ContinualPolicy(
            self.options.reset_every, self.options.collapse_window, self.options.collapse_entropy, self._adapter.num_classes
        )
        self._calibrations, self.calibration = folder_calibrations(self.folder, self.options, self.task, card.scope)
        self._last_pruning: list[dict[str, Any] | None] = []  # per image of the latest frozen forward
        self._threads = ThreadPolicy(self.model, card.preprocessing.size, self.device, self.options.threads)
        self._ort = None  # the frozen path on ONNX Runtime, when options.backend says so
        if self.options.backend == "onnxruntime" and self.options.prune is not None:
            raise ConfigError("prune= runs on backend='torch' (export a pruned path with `tta-runtime bench prune`)")
        if self.options.backend == "onnxruntime":
            if self.task != "segmentation":
                raise ConfigError("backend='onnxruntime' supports the slot segmenter only for now; use backend='torch'")
            from tta_runtime.deploy import OrtFrozenPath, OrtOptions, providers_for_device

            ort_threads = self.options.onnxruntime_threads  # None: as the thread policy chooses for one image

            self._ort = OrtFrozenPath(
                self.model, card, calibration=self.calibration, providers=providers_for_device(self.device),
                options=OrtOptions(intra_op_num_threads=ort_threads if ort_threads is not None else self._threads.choose(1)),
                score_ood=self.options.score_ood,
            )

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str] | None = None, *, trust_code: bool = False, **overrides: Any) -> Runtime:
        """Load a model by repository name (None = the default model), folder, card or weights path.

        `overrides` are runtime options (`device`, `max_pixels`, `recipe`, `mode`) or recipe fields
        (`steps`, `lr`, `params`, ...), validated; unknown names raise `ConfigError`. A folder written by
        `save` names Python code ("python:package.module:function"): loading it imports and runs that code,
        so it is refused (`ModelLoadError`, nothing run) unless `trust_code=True`.
        """
        runtime_kw, recipe_kw = split_overrides(overrides)
        options = validate(RuntimeOptions, runtime_kw, "runtime options")
        folder = find_model(name_or_path)
        card = load_card(folder)
        check_trust(card, folder, trust_code)  # before anything is built: the card is data, the builder is code
        if "recipe" not in runtime_kw:
            options = with_overrides(options, {"recipe": folder_recipe(folder) or card.default_recipe}, "runtime options")
        recipe = load_recipe(options.recipe, **recipe_kw)
        model = folder_model(folder, card, options.prune)
        optimizer_state = load_optimizer_state(folder, card)
        fisher = load_weights(folder, card, card.fisher) if card.fisher is not None else None
        return cls(
            model, card, options=options, recipe=recipe, folder=folder, optimizer_state=optimizer_state, fisher=fisher
        )

    @classmethod
    def from_architecture(
        cls, source: str, name: str, *, weights: str | os.PathLike[str], num_classes: int, input_size: int = 224,
        labels: list[str] | None = None, recipe: str = "tent", preprocessing: Any = None, **overrides: Any,
    ) -> Runtime:
        """A torchvision or timm classifier by name with weights from a local file (nothing downloads).

        `source` "torchvision" | "timm" (each an optional extra; a missing one raises `ConfigError`
        naming it); `weights`: .safetensors, or a state dict read with `torch.load(weights_only=True)`.
        Mismatched keys or shapes raise `ModelLoadError` naming them. `preprocessing`: as in `from_module`
        (default mean/std: ImageNet's). `overrides` as in `from_pretrained`.
        """
        from tta_runtime.custom import architecture_parts

        model, card, options, cfg = architecture_parts(
            source, name, weights=weights, num_classes=num_classes, input_size=input_size, labels=labels, recipe=recipe,
            preprocessing=preprocessing, overrides=overrides,
        )
        return cls(model, card, options=options, recipe=cfg, folder=None)

    @classmethod
    def from_module(
        cls, module: torch.nn.Module, *, task: str = "classification", input_size: int, labels: list[str] | None = None,
        preprocessing: Any = None, recipe: str = "tent", features: str | None = None, name: str = "custom-model",
        **overrides: Any,
    ) -> Runtime:
        """Any classifier `nn.Module` (forward: (B, 3, S, S) -> logits (B, C), or a dataclass / dict with `logits`).

        The runtime adapts its own copy (BatchNorm2d made batch-1 safe; norm affine parameters adapt; rotation
        TTT is refused: no rotation head). `preprocessing`: a `Preprocessing` or a dict of its fields, of size
        `input_size`. OOD features: the last `nn.Linear`'s input, or the output of the submodule `features`.
        See `tta_runtime.custom`; `calibrate` fits OOD scorers and Fisher, `save` writes a folder."""
        from tta_runtime.custom import module_parts

        model, card, options, cfg = module_parts(
            module, task=task, input_size=input_size, labels=labels, preprocessing=preprocessing, recipe=recipe,
            features=features, name=name, overrides=overrides,
        )
        return cls(model, card, options=options, recipe=cfg, folder=None)

    def calibrate(
        self, images: Any, labels: Any = None, *, channel_order: str = "rgb", tpr: float = 0.99, holdout: float = 0.2,
        scorers: list[str] | None = None, fisher: bool = True, progress: Any = None,
    ) -> Any:
        """Fit every OOD scorer (and EATA's Fisher) on in-distribution `images` (a batch, as `predict` takes).

        `labels` (N,) class indices, or None: the model's predictions stand in. A seeded `holdout` share sets
        each threshold at `tpr` (0.99: the held-out images are usually training images, tighter than new ones). Afterwards `is_ood` uses the default classifier scorer (or `ood_scorer`), and
        `save` writes every calibration. `progress(done, total, stage)` after every chunk. Returns a
        `CalibrationReport`."""
        from tta_runtime.calibration_run import calibrate_classifier

        with self._lock:
            if self._adapting or self._weights_moved:
                raise ConfigError("calibrate() describes the loaded weights: call it outside on_step, after reset() in continual mode")
            items, _ = self._items(images)
            report = calibrate_classifier(
                self.model, self.card, lambda chunk: torch.cat([p.tensor for p in self._prepare(list(chunk), channel_order)]),
                items, labels, device=self.device, default=self.options.ood_scorer, tpr=tpr,
                holdout=holdout, scorers=scorers, fisher=fisher, progress=progress,
            )
            self._calibrations, self.calibration = report.calibrations, report.calibrations[report.default]
            if report.fisher is not None:
                self._fisher = report.fisher
                self._adapter = Adapter(self.model, self.recipe, training_optimizer_state=self._adapter.training_optimizer_state,
                                        fisher=report.fisher)
        return report

    def save(self, folder: str | os.PathLike[str], *, builder: str | None = None, name: str | None = None,
             overwrite: bool = False) -> Path:
        """Write a model folder (card naming "python:<builder>", safetensors weights with sha256, Fisher, ood/, recipe)
        that `from_pretrained(folder, trust_code=True)` loads. `builder`: "package.module:function" returning the
        network (checked here: built, loaded, one forward compared)."""
        from tta_runtime.save import save_folder

        with self._lock:
            if self._adapting or self._weights_moved:
                raise ConfigError("save() writes the loaded weights: call it outside on_step, after reset() in continual mode")
            return save_folder(Path(folder), model=self.model, card=self.card, recipe=self.recipe, calibrations=self._calibrations,
                               fisher=self._fisher, builder=builder, name=name, overwrite=overwrite)

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
        numpy (N, H, W, C) (gray: (N, H, W, 1)), torch (N, C, H, W) with N > 1, a list of images), run in
        chunks of `PREDICT_CHUNK`. See `Result` for shapes and ranges."""
        items, is_batch = self._items(image)
        t0 = time.perf_counter()
        prepared = self._prepare(items, channel_order, image if is_batch else None)
        results = self._request(prepared, "never", None, None, time.perf_counter() - t0)
        return results if is_batch else results[0]

    def adapt_and_predict(
        self, image: Any, *, channel_order: str = "rgb", on_step: StepCallback | None = None,
        adapt: str | None = None, **overrides: Any,
    ) -> Result | list[Result]:
        """Adapt with the runtime's recipe (fields overridable per call), then predict.

        One image gives one Result, a batch a list (as `predict`). A segmenter adapts to each image of a
        batch in turn (or, with the recipe's `[execution]`, to all of them at once, each with its own
        weights); a classifier adapts once on the whole batch (the recipe's loss is a batch loss).
        `adapt` ("always" | "never" | "when_ood", default: the runtime's option) gates the adaptation:
        with "when_ood", inputs the calibrated OOD scorer calls in-distribution take the predict path
        and their report says why no step ran. In episodic mode (default) the model's parameters and
        buffers are bit-exact afterwards; in continual mode the adapted state carries over to the next
        call until `reset()`. A per-call `mode="continual"` on an episodic runtime carries its weights
        only to the next per-call continual calls (a stream): the runtime's own episodic calls and predict
        start from the loaded weights again. `on_step(step, output)` may call `predict`, not
        `adapt_and_predict` or `reset` (`ConfigError`).
        """
        if on_step is not None and not callable(on_step):
            raise ConfigError(f"on_step must be a callable on_step(step, output) or None, got {type(on_step).__name__} {on_step!r}")
        on_step, gate = check_step_callback(on_step), self._gate(adapt)
        recipe = self._recipe_for(overrides)
        items, is_batch = self._items(image)
        t0 = time.perf_counter()
        prepared = self._prepare(items, channel_order, image if is_batch else None)
        t_prep = time.perf_counter() - t0
        if self.task == "segmentation" and (recipe.execution is None or len(prepared) == 1):
            groups = [[p] for p in prepared]  # one image at a time, each adapted from the state the last one left
        else:
            groups = [prepared]
        results: list[Result] = []
        for group in groups:
            results += self._request(group, gate, recipe, on_step, t_prep * len(group) / len(prepared))
        return results if is_batch else results[0]

    def _request(
        self, prepared: list[PreparedImage], gate: str, recipe: AdaptConfig | None, on_step: StepCallback | None,
        t_prep: float,
    ) -> list[Result]:
        """`_request_chunk` over `prepared` in chunks (`PREDICT_CHUNK`; a classifier's adaptation batch:
        `CLASSIFIER_ADAPT_CHUNK`), all under the lock: no other call runs between the chunks of this one."""
        size = CLASSIFIER_ADAPT_CHUNK if recipe is not None and self.task == "classification" else PREDICT_CHUNK
        results: list[Result] = []
        with self._lock, self._threads.request(len(prepared)):
            if recipe is not None and self._adapting:
                raise ConfigError(_REENTRANT.format(what="adapt_and_predict"))
            stream = self._adapting or self.recipe.mode == "continual" or (recipe is not None and recipe.mode == "continual")
            if self._weights_moved and not stream:  # a per-call continual stream ended: back to the loaded weights
                self._reset()
            for start in range(0, len(prepared), size):
                part = prepared[start : start + size]
                results += self._request_chunk(part, gate, recipe, on_step, t_prep * len(part) / len(prepared))
        return results

    def _request_chunk(
        self, prepared: list[PreparedImage], gate: str, recipe: AdaptConfig | None, on_step: StepCallback | None,
        t_prep: float,
    ) -> list[Result]:
        """The one pipeline (under the lock): frozen pass + OOD scores -> gate -> adapt the chosen inputs -> Results.

        `recipe` None means predict. A segmenter's group timings are shared out per image; a classifier's
        batch is one forward and one adaptation, and each of its Results carries the batch's timings."""
        x = torch.cat([p.tensor for p in prepared]).to(self.device)  # prepared tensors share the model's size
        n = len(prepared)
        t1 = time.perf_counter()
        if recipe is not None and gate == "always" and not self.options.score_ood:  # nothing needs the frozen pass
            out, scores, self._last_pruning = None, [NO_SCORE] * n, [None] * n
        else:  # every input adapts and the scorer reads the first convolution: that convolution is all the pass runs
            out, scores = self._frozen_path(x, stem_only=recipe is not None and gate == "always" and needs_stem(self.calibration))
        t_fwd = time.perf_counter() - t1
        pruning = self._last_pruning
        reasons = [self._skip_reason(gate, sc) for sc in scores]
        chosen = [i for i, r in enumerate(reasons) if r is None]
        reports: list[AdaptationReport | None] = [None] * n
        batch_report = None
        if recipe is not None and chosen:
            self._adapting = True
            try:
                adapted, chosen_reports = self._adapt(x[chosen], recipe, on_step)
            finally:
                self._adapting = False
            out = adapted if out is None else merge_rows(out, adapted, chosen)
            for j, i in enumerate(chosen):
                reports[i] = chosen_reports[j]
            batch_report = chosen_reports[0]
        if recipe is not None:
            reports = [r or skipped_report(recipe, reasons[i] or "", x.device) for i, r in enumerate(reports)]
        share = n if self.task == "segmentation" else 1
        ctx = ResultContext(self.name, str(self.device), self.backend,
                            {"preprocess_s": t_prep / share, "forward_s": t_fwd / share})
        if self.task == "classification":
            results = classifier_results(out.logits, self.card.labels, prepared, scores, reports, pruning, ctx)
        else:
            results = segmenter_results(self.model.cfg, out, x, prepared, scores, reports, pruning, ctx)
        for r in results:  # a classifier's batch was adapted once: its timings are the batch's
            report = batch_report if self.task == "classification" and batch_report is not None else r.adaptation
            if report is not None:
                r.timings.update({f"adapt_{k}": v for k, v in report.timings.items()})
        return results

    def _adapt(
        self, x: torch.Tensor, recipe: AdaptConfig, on_step: StepCallback | None
    ) -> tuple[Any, list[AdaptationReport]]:
        """Adapt on `x` (call under the lock): the adapted output and one report per input of `x`."""
        if self.task == "segmentation" and x.shape[0] > 1:  # the recipe's [execution]: all at once
            return self._adapt_batched(x, recipe, on_step)
        with self._fixed_masks(x):
            final, report = self._adapter.run(x, cfg=recipe, on_step=on_step)
        labels = final.logits.argmax(dim=1).tolist() if self.task == "classification" else None
        self._count_adapted(report, x.shape[0], labels)
        return final, [report] * x.shape[0]

    def _adapt_batched(
        self, x: torch.Tensor, recipe: AdaptConfig, on_step: StepCallback | None
    ) -> tuple[Any, list[AdaptationReport]]:
        """Each image of `x` adapted with its own weights at once (`BatchedAdapter`), in chunks of
        `execution.batch_size`; the model's weights stay untouched."""
        from tta_runtime.adapt.batched import BatchedAdapter

        if on_step is not None:
            raise ConfigError("on_step is called by the one-image loop; batched execution has no per-step callback: "
                              "drop the recipe's [execution] (or pass execution=None) to watch the steps")
        if self.options.prune is not None:
            raise ConfigError("batched execution does not run pruned variants yet; load without prune= or drop the "
                              "recipe's [execution]")
        batched = BatchedAdapter(
            self.model, recipe, execution=recipe.execution, training_optimizer_state=self._adapter.training_optimizer_state,
        )
        return batched.run(x)

    @property
    def backend(self) -> str:
        """'onnxruntime' or 'torch': what runs the frozen path (adaptation always runs in PyTorch)."""
        return "onnxruntime" if self._ort is not None else "torch"

    def export(self, path: str | os.PathLike[str] | None = None, *, format: str = "onnx", part: str = "predictor", **options: Any) -> Any:
        """Export the frozen path with the model's current weights (adapted ones after continual adaptation).

        `format` "onnx" | "tensorrt"; `part` "encoder" | "predictor" | "predictor_ood"; `options`: half,
        dynamic, opset, batch, device, workspace (see `tta_runtime.deploy.export`). Returns an
        `ExportResult` (paths, manifest with the tolerances met).
        """
        from tta_runtime.deploy import export

        check_keywords(options, [k for k in keywords_of(export, skip=4) if k not in ("part", "calibration")], "export()")
        with self._lock:
            return export(self.model, self.card, format, path, part=part, calibration=self.calibration, **options)

    def stream(self, source: Any, **options: Any) -> Any:
        """Per-frame Results over a video file, webcam index, URL or iterable of frames (see `tta_runtime.video.stream`)."""
        from tta_runtime.video import stream

        return stream(self, source, **options)

    def reset(self) -> None:
        """Back to the loaded weights (continual mode); a no-op in effect for episodic use. Refused
        (`ConfigError`) from inside an on_step callback."""
        with self._lock:
            if self._adapting:
                raise ConfigError(_REENTRANT.format(what="reset()"))
            self._reset()

    def _reset(self) -> None:
        self._adapter.reset()
        self._policy.clear()
        self._weights_moved = False

    def _count_adapted(self, report: AdaptationReport, n: int, labels: list[int] | None = None) -> None:
        """Continual mode's reset policy (`adapt.reset.ContinualPolicy`) after `n` adapted inputs."""
        if report.mode != "continual":
            return
        if report.reset:  # the method itself reset the adapter (SAR's collapse signal)
            self._policy.clear()
            self._weights_moved = False
            return
        self._weights_moved = self._weights_moved or report.steps_run > 0
        why = self._policy.update(n, labels)
        if why is not None:
            log.info("continual reset (%s)", why)
            self._reset()
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

    def _fixed_masks(self, x: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
        """A pruned model decides its masks on the adaptation loop's first forward of `x` (the recipe's
        normalisation, before any update) and every later step reuses them."""
        fixed = getattr(self.model, "fixed_masks", None)
        return fixed() if fixed is not None else contextlib.nullcontext()

    def _gate(self, adapt: str | None) -> str:
        gate = adapt or self.options.adapt
        if gate not in ("always", "never", "when_ood"):
            raise ConfigError(f"adapt must be 'always', 'never' or 'when_ood', got {gate!r}")
        if gate == "when_ood" and not self.options.score_ood:
            raise ConfigError("adapt='when_ood' needs OOD scores: load without score_ood=False")
        if gate == "when_ood" and self.calibration is None:
            if self.folder is None:
                raise ConfigError("adapt='when_ood' needs a calibrated OOD scorer: call rt.calibrate(in_distribution_images) first")
            load_calibration(self.folder)  # raises, saying how to fit one
        return gate

    def _frozen_path(self, x: torch.Tensor, stem_only: bool = False) -> tuple[Any, list[OODScore]]:
        """Forward pass without gradients (the current weights; none with `stem_only`), and each input's `OODScore`:
        the scores describe the input, so once continual adaptation has moved the weights they come from a pass
        with the loaded ones (which the calibration was fitted for) and the same input always scores the same."""
        if not self.options.score_ood and self._ort is None:
            with torch.inference_mode():
                out = self.model(x)
            self._last_pruning = pruning_info(self.model, self.options.prune, x.shape[0])
            return out, [NO_SCORE] * x.shape[0]
        embedding = self.calibration.embedding if self.calibration else "encoder"
        kinds = {"stem": needs_stem(self.calibration), "stem_only": stem_only and self._ort is None}
        if self._ort is not None:
            out, oods = self._ort(x)
            self._last_pruning = [None] * x.shape[0]
            if not self.options.score_ood:
                return out, [NO_SCORE] * x.shape[0]
            if not self._weights_moved:
                return out, warn_far_ood([OODScore(*o) for o in oods], self.card)
        else:
            if not (stem_only and self._weights_moved):  # (then only the loaded weights' pass below runs)
                with torch.inference_mode():
                    out, feats = FeaturePass(self.model, self.task, embedding, **kinds)(x)
            self._last_pruning = [None] * x.shape[0] if stem_only else pruning_info(self.model, self.options.prune, x.shape[0])
        if self._weights_moved:
            feats = features_with(self.model, self.task, embedding, x, self._adapter.loaded_state, **kinds)
            out = None if kinds["stem_only"] else out
        return out, warn_far_ood(ood_scores(feats, self.calibration, self.card), self.card)

    def _items(self, image: Any) -> tuple[list[Any], bool]:
        batch = split_batch(image)
        return (batch, True) if batch is not None else ([image], False)

    def _prepare(self, items: list[Any], channel_order: str, whole: Any = None) -> list[PreparedImage]:
        return prepare_images(items, whole=whole, channel_order=channel_order, max_pixels=self.options.max_pixels,
                              preprocessing=self.card.preprocessing)

    def _skip_reason(self, gate: str, score: OODScore) -> str | None:
        if gate == "never":
            return "adapt='never'"
        if gate == "when_ood" and not score.is_ood:
            return f"in distribution ({score.scorer} {score.score:.3g} <= threshold {self.calibration.threshold:.3g})"  # type: ignore[union-attr]
        return None
