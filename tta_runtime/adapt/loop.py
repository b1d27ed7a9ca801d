"""The adaptation loop: the one place where test-time gradient steps happen.

Per call: choose the parameters (recipe `params`), snapshot the model on its own device, build or reuse
the optimizer, then for each step take the method's loss (a slot model decodes all pixels or a random
subset; a classifier method runs the model on the batch or on views of it), check it and the gradients
are finite, clip, step (SAM: climb to the worst nearby weights, take the gradient there, come back,
step). Afterwards predict once with the adapted weights. For classifiers the recipe's `norm_stats`
chooses the BatchNorm statistics for the whole call, adaptation and prediction.
Episodic mode restores parameters and buffers bit for bit after every call, whatever happened;
continual mode keeps them (and the optimizer state) until `reset()`.

A non-finite loss, gradient or weight rolls the model back to the last good weights, stops the loop
and says so in the report; an exception restores the state the call started from.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

import torch
from torch import nn

from tta_runtime.config import AdaptConfig
from tta_runtime.errors import ConfigError
from tta_runtime.adapt.methods import Method, MethodContext, get_method
from tta_runtime.adapt.methods.base import entropy
from tta_runtime.models.segmenter import SlotSegmenter, image_targets

log = logging.getLogger(__name__)

StepCallback = Callable[[int, Any], None]

LAST_FORWARD_METHODS = ("tent", "eata", "sar", "bn_stats")
"""Classifier methods whose loss runs the model on the input itself (first, in SAR's case): the recipe's
prediction='last_forward' returns that forward's outputs."""


@dataclass
class AdaptationReport:
    """What one adaptation did. `losses[i]` is the loss before update i; `final_loss` after the last."""

    recipe: str
    method: str
    mode: str
    params: str
    params_adapted: int
    steps_requested: int
    steps_run: int = 0
    losses: list[float] = field(default_factory=list)
    final_loss: float | None = None
    stopped_early: bool = False
    rolled_back: bool = False
    rollback_reason: str | None = None
    skipped: str | None = None  # why no step ran (the OOD gate said the input is in distribution)
    reset: bool = False  # continual mode: the method signalled collapse and the model was reset after this call
    method_info: dict[str, Any] = field(default_factory=dict)  # e.g. how many samples a filter kept
    device: str = "cpu"
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_step_callback(on_step: Any) -> StepCallback | None:
    """`on_step` as given when it is None or callable; else `ConfigError` (before anything runs)."""
    if on_step is not None and not callable(on_step):
        raise ConfigError(f"on_step must be a callable on_step(step, output) or None, got {type(on_step).__name__} {on_step!r:.60}")
    return on_step


def skipped_report(recipe: AdaptConfig, why: str, device: torch.device) -> AdaptationReport:
    """The report of an input that took no step (`why`: the gate's reason)."""
    return AdaptationReport(
        recipe=recipe.name, method=recipe.method, mode=recipe.mode, params=recipe.params, params_adapted=0,
        steps_requested=recipe.steps, device=str(device), skipped=why, timings={"total_s": 0.0},
    )


def check_recipe_fits(cfg: AdaptConfig, task: str) -> None:
    """`ConfigError` for a recipe this kind of model cannot run (SAM's second pass needs a classifier method)."""
    if cfg.prediction == "last_forward" and (task == "segmentation" or cfg.method not in LAST_FORWARD_METHODS):
        raise ConfigError(
            f"recipe {cfg.name!r}: prediction='last_forward' reuses the outputs of a classifier method's forward on "
            f"the input itself ({', '.join(LAST_FORWARD_METHODS)}); method {cfg.method!r} "
            f"{'adapts a segmenter' if task == 'segmentation' else 'runs the model on other views'}: use prediction='adapted'"
        )
    if cfg.optimizer == "sam" and task == "segmentation":
        raise ConfigError(
            f"recipe {cfg.name!r}: optimizer='sam' (sharpness-aware, SAR's) adapts classifiers only; a slot segmenter's "
            "recipe takes optimizer='adam' or 'sgd'"
        )


def select_parameters(model: nn.Module, spec: str) -> dict[str, nn.Parameter]:
    """Parameters named by a recipe's `params` ('all', 'norm', 'no_encoder', 'decoder', 're:<regex>')."""
    named = dict(model.named_parameters())
    if spec == "all":
        chosen = named
    elif spec == "norm":
        norm_names = {
            f"{mod_name}.{p}"
            for mod_name, mod in model.named_modules()
            if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm))
            for p, _ in mod.named_parameters(recurse=False)
        }
        chosen = {n: p for n, p in named.items() if n in norm_names}
    elif spec == "no_encoder":
        chosen = {n: p for n, p in named.items() if not n.startswith("encoder.")}
    elif spec == "decoder":
        chosen = {n: p for n, p in named.items() if n.startswith("decoder.")}
    else:  # "re:<regex>", validated by AdaptConfig
        pattern = re.compile(spec[3:])
        chosen = {n: p for n, p in named.items() if pattern.search(n)}
    if not chosen:
        raise ConfigError(f"params={spec!r} selects no parameter; names look like {list(named)[:4]}")
    return chosen


def _build_optimizer(params: list[nn.Parameter], cfg: AdaptConfig) -> torch.optim.Optimizer:
    """Adam or SGD; for 'sam' the base SGD (the loop does the sharpness-aware climb itself)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_at(cfg: AdaptConfig, step: int) -> float:
    """The learning rate for update `step` (0-based): linear warm-up, then constant or cosine decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup_steps - 1, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.lr * (cfg.lr_final_fraction + (1 - cfg.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * t)))


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Every element of every tensor finite: the largest magnitude per tensor (one batched op; NaN and inf
    propagate through it) is finite, checked with one synchronisation."""
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


class Adapter:
    """Runs adaptation on one model. Not thread-safe by itself: the `Runtime` serialises calls."""

    def __init__(
        self, model: nn.Module, cfg: AdaptConfig, *, recipe_name: str | None = None,
        training_optimizer_state: dict[str, torch.Tensor] | None = None,
        fisher: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.task = "segmentation" if isinstance(model, SlotSegmenter) else "classification"
        check_recipe_fits(cfg, self.task)
        self.training_optimizer_state = training_optimizer_state
        self.cfg = cfg
        self.recipe_name = recipe_name or cfg.name
        # Continual mode: the weights the model was loaded with, for reset(), and the carried optimizer.
        self._source = {k: t.detach().clone() for k, t in _state_tensors(model).items()}
        head = getattr(model, "head", None)
        self._context = MethodContext(
            fisher=fisher, source={n: p.detach().clone() for n, p in model.named_parameters()},
            num_classes=int(getattr(model, "num_classes", 0) or (head.out_features if isinstance(head, nn.Linear) else 0)),
        )
        self._methods: dict[str, Method] = {}  # one instance per method name: some keep state across calls
        self._selected: dict[str, dict[str, nn.Parameter]] = {}  # params spec -> the parameters it selects
        self.method: Method = self._method(cfg.method)
        self._optimizer: torch.optim.Optimizer | None = None
        self._opt_key: tuple[object, ...] | None = None
        # Stochastic restore's masks: one generator for the adapter's life (until reset), so that a continual
        # stream does not draw the same masks on every frame.
        self._restore_gen: torch.Generator | None = None

    def _chosen(self, spec: str) -> dict[str, nn.Parameter]:
        """`select_parameters(model, spec)`, looked up once per spec (the model's structure does not change)."""
        if spec not in self._selected:
            self._selected[spec] = select_parameters(self.model, spec)
        return self._selected[spec]

    @property
    def loaded_state(self) -> dict[str, torch.Tensor]:
        """The parameters and buffers the model was loaded with (what `reset()` restores); read-only by contract."""
        return self._source

    @property
    def num_classes(self) -> int:
        """A classifier's class count (0 for segmenters)."""
        return self._context.num_classes

    def _method(self, name: str) -> Method:
        if name not in self._methods:
            method = get_method(name, self._context)
            if method.task != self.task:
                raise ConfigError(
                    f"method {name!r} adapts {method.task} models, but this model does {self.task}; "
                    f"use a {self.task} recipe (tta-runtime list)"
                )
            self._methods[name] = method
        return self._methods[name]

    # -- state -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the loaded weights, a fresh optimizer and fresh method state (continual mode's reset)."""
        with torch.no_grad():
            for k, t in _state_tensors(self.model).items():
                t.copy_(self._source[k])
        self._optimizer, self._opt_key = None, None
        self._restore_gen = None
        self._methods.clear()
        self.method = self._method(self.cfg.method)

    def _snapshot(self, chosen: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """What a call can change: the chosen parameters (the optimizer, stochastic restore, rollbacks) and the
        buffers (BatchNorm statistics in 'ema' mode). The other parameters do not take gradients."""
        with torch.no_grad():
            return {**{k: p.detach().clone() for k, p in chosen.items()},
                    **{k: b.detach().clone() for k, b in self.model.named_buffers()}}

    def _restore(self, snap: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            state = _state_tensors(self.model)
            torch._foreach_copy_([state[k] for k in snap], list(snap.values()))

    # -- the loop ----------------------------------------------------------------------------------
    def run(
        self, image: torch.Tensor, *, cfg: AdaptConfig | None = None, on_step: StepCallback | None = None
    ) -> tuple[Any, AdaptationReport]:
        """Adapt on one image (1, 3, S, S) in [0, 1] (a classifier: a batch (B, 3, S, S)) and predict with
        the adapted weights.

        `on_step(i, out)` sees the full output before update i and, last, after the final update
        (i = steps_run): evaluation uses it for per-step metrics (the oracle best step).
        Returns the final prediction (`SegmenterOutput` or `ClassifierOutput`, all pixels, no autograd
        graph) and the report.
        """
        cfg = cfg or self.cfg
        check_step_callback(on_step)
        method = self._method(cfg.method)  # a method for the other kind of model: say that first
        check_recipe_fits(cfg, self.task)
        model = self.model
        chosen = self._chosen(cfg.params)
        report = AdaptationReport(
            recipe=self.recipe_name if cfg is self.cfg else cfg.name, method=cfg.method, mode=cfg.mode,
            params=cfg.params, params_adapted=sum(p.numel() for p in chosen.values()),
            steps_requested=cfg.steps, device=str(image.device),
        )
        t0 = time.perf_counter()
        start_state = self._snapshot(chosen)  # on the model's device; restores episodic calls and failures
        named = dict(model.named_parameters())
        flags = {n: p.requires_grad for n, p in named.items()}
        hooks: list[Any] = []
        ok = False
        classifier = self.task == "classification"
        if classifier:
            from tta_runtime.models.classifier import set_norm_mode

            set_norm_mode(model, cfg.norm_stats, cfg.norm_prior, cfg.norm_momentum)
        try:
            for n, p in named.items():
                p.requires_grad_(n in chosen)
            params = list(chosen.values())
            # A carried optimizer is reused only for the same parameters and the same optimizer settings.
            key = (*chosen, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.optimizer_state)
            if cfg.mode == "continual" and self._optimizer is not None and self._opt_key == key:
                opt = self._optimizer
            else:
                opt = _build_optimizer(params, cfg)
                if cfg.optimizer_state == "training":
                    self._load_training_moments(opt, chosen)
            frozen_encoder = not classifier and not any(n.startswith("encoder.") for n in chosen)
            features = None
            if frozen_encoder:  # the encoder's output cannot change: compute it once for every step
                with torch.no_grad():
                    features = model.encode(image)
            report.timings["setup_s"] = time.perf_counter() - t0

            captured: list[Any] = []  # prediction='last_forward': the step's first forward on `image`
            if cfg.prediction == "last_forward":
                hooks.append(model.register_forward_hook(
                    lambda _m, args, output: captured.append(output) if not captured and args and args[0] is image else None
                ))
            t_loop = time.perf_counter()
            gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
            n_pix = image.shape[-1] * image.shape[-2]
            n_sub = max(1, round(n_pix * cfg.pixel_fraction))
            last_good = [p.detach().clone() for p in params]
            scheduled = cfg.warmup_steps > 0 or cfg.lr_schedule != "constant"
            best, since_best = float("inf"), 0
            for step in range(cfg.steps):
                captured.clear()
                idx = None
                if n_sub < n_pix:
                    idx = torch.randperm(n_pix, generator=gen)[:n_sub].to(image.device)
                with torch.enable_grad():
                    if classifier:
                        loss = method.loss(model, image, gen)
                    else:
                        out = model.forward_features(features, idx) if features is not None else model(image, idx)
                        loss = method.loss(out, image_targets(image, idx))
                if on_step is not None:
                    on_step(step, self._full_forward(image, features) if classifier or idx is not None else out)
                value = float(loss.detach())
                report.losses.append(value)
                if not torch.isfinite(loss):
                    self._rollback(params, last_good, report, f"non-finite loss at step {step}")
                    break
                if not loss.requires_grad:  # the method kept no sample of this batch (EATA, SAR): no update
                    report.steps_run = step + 1
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grads = [p.grad for p in params if p.grad is not None]
                if grads and not _all_finite(grads):
                    self._rollback(params, last_good, report, f"non-finite gradient at step {step}")
                    break
                with torch.no_grad():  # these weights gave a finite loss and gradient: the last good ones
                    torch._foreach_copy_(last_good, [p.detach() for p in params])
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                if scheduled:
                    for group in opt.param_groups:
                        group["lr"] = lr_at(cfg, step)
                if cfg.optimizer == "sam" and not self._sam_second_pass(method, image, gen, params, cfg.sam_rho):
                    self._rollback(params, last_good, report, f"non-finite sharpness-aware loss at step {step}")
                    break
                opt.step()
                if cfg.restore_prob > 0:
                    self._stochastic_restore(chosen, cfg)
                if not _all_finite([p.detach() for p in params]):
                    self._rollback(params, last_good, report, f"non-finite weights after step {step}")
                    break
                report.steps_run = step + 1
                if cfg.time_budget_ms is not None and (time.perf_counter() - t_loop) * 1e3 >= cfg.time_budget_ms:
                    report.stopped_early = True
                    break
                if cfg.early_stop_patience is not None:
                    if value < best * (1 - cfg.early_stop_min_delta):
                        best, since_best = value, 0
                    else:
                        since_best += 1
                        if since_best >= cfg.early_stop_patience:
                            report.stopped_early = True
                            break
            report.timings["adapt_s"] = time.perf_counter() - t_loop

            t_pred = time.perf_counter()
            if captured and report.steps_run > 0 and not report.rolled_back and is_dataclass(captured[0]):
                last = captured[0]  # the forward before the last update, without its graph
                final = replace(last, **{f.name: getattr(last, f.name).detach() for f in fields(last)})
            else:
                final = self._full_forward(image, features)
            with torch.no_grad():  # classifiers: the mean prediction entropy, whatever the method's loss
                report.final_loss = float(
                    entropy(final.logits).mean() if classifier else method.loss(final, image_targets(image))
                )
            report.method_info = dict(getattr(method, "info", {}))
            if on_step is not None:
                on_step(report.steps_run, final)
            report.timings["predict_s"] = time.perf_counter() - t_pred
            if cfg.mode == "continual":  # after a rollback the moments belong to weights we threw away
                self._optimizer, self._opt_key = (None, None) if report.rolled_back else (opt, key)
            ok = True
        finally:
            for h in hooks:
                h.remove()
            for n, p in named.items():
                p.requires_grad_(flags[n])
                p.grad = None
            if classifier:
                set_norm_mode(model, "source")
            if cfg.mode == "episodic" or not ok:
                self._restore(start_state)
            if not ok:  # the carried optimizer may have stepped: it no longer matches the restored weights
                self._optimizer, self._opt_key = None, None
        if cfg.mode == "continual" and getattr(method, "needs_reset", False):
            log.info("method %s signalled collapse: resetting the model to its loaded weights", cfg.method)
            self.reset()
            report.reset = True
        report.timings["total_s"] = time.perf_counter() - t0
        return final, report

    def _stochastic_restore(self, chosen: dict[str, nn.Parameter], cfg: AdaptConfig) -> None:
        """CoTTA's stochastic restore: W <- M * W_loaded + (1 - M) * W, M ~ Bernoulli(restore_prob) per element.
        The optimizer's moments are kept, as in CoTTA."""
        device = next(iter(chosen.values())).device
        if self._restore_gen is None or self._restore_gen.device != device:
            self._restore_gen = torch.Generator(device=device).manual_seed(cfg.seed)
        with torch.no_grad():
            for name, p in chosen.items():
                mask = torch.rand(p.shape, generator=self._restore_gen, device=device) < cfg.restore_prob
                p.copy_(torch.where(mask, self._source[name].to(device), p))

    def _load_training_moments(self, opt: torch.optim.Optimizer, chosen: dict[str, nn.Parameter]) -> None:
        """Start Adam where training left it (the released Slot-TTA code does this)."""
        state = self.training_optimizer_state
        if state is None:
            raise ConfigError(
                "optimizer_state='training' needs Adam moments saved with the model, and this model ships none; "
                "use optimizer_state='fresh'"
            )
        step = state["step"].reshape(()).float()
        for name, p in chosen.items():
            opt.state[p] = {
                "step": step.clone(),
                "exp_avg": state[f"exp_avg/{name}"].to(p.device, copy=True),
                "exp_avg_sq": state[f"exp_avg_sq/{name}"].to(p.device, copy=True),
            }

    def _full_forward(self, image: torch.Tensor, features: torch.Tensor | None) -> Any:
        with torch.no_grad():
            return self.model.forward_features(features) if features is not None else self.model(image)

    def _sam_second_pass(
        self, method: Method, image: torch.Tensor, gen: torch.Generator, params: list[nn.Parameter], rho: float
    ) -> bool:
        """SAM (Foret et al. 2021): move to w + rho * g / |g|, replace the gradient by the one taken there,
        move back. The base optimizer then steps from w. False when the perturbed loss is not finite."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.norm(torch.stack([g.norm() for g in grads]))
        scale = rho / (norm + 1e-12)
        with torch.no_grad():
            eps = [g * scale for g in grads]
            torch._foreach_add_(params, eps)
        for p in params:
            p.grad = None
        second = getattr(method, "sam_loss", method.loss)
        with torch.enable_grad():
            loss = second(self.model, image, gen)
        finite = bool(torch.isfinite(loss))
        if finite and loss.requires_grad:
            loss.backward()
        with torch.no_grad():
            torch._foreach_sub_(params, eps)
        return finite

    @staticmethod
    def _rollback(params: list[nn.Parameter], last_good: list[torch.Tensor], report: AdaptationReport, why: str) -> None:
        with torch.no_grad():
            torch._foreach_copy_(params, last_good)
        report.rolled_back = True
        report.rollback_reason = why
        log.warning("adaptation rolled back to the last good weights: %s", why)
