"""Several images adapted at once, each with its own weights: a Slot-TTA recipe as one batched program.

The one loop (`adapt.loop.Adapter`) adapts one image at a time. At small sizes, and on a GPU at any size,
a step is mostly overhead (kernel launches, Python), so B independent adaptations run together cost less
per image than B in turn. Here, for the same recipe (loss, parameters, Adam, lr schedule, pixel
subsets, gradient clipping, early stop), on B images:

  selected parameters, stacked    {name: (B, *shape)}   one copy of the model's weights per image
  loss_b(weights_b, image_b)      the model's forward under `torch.func.functional_call`, one image
  vmap(grad_and_value(loss))      per-image losses (B,) and gradients {name: (B, *shape)} in one call
  functional Adam on the stack    Adam is element-wise, so one update of the stack is B per-image Adams

Parameters that the recipe does not adapt are shared, unbatched. With params='no_encoder' the encoder
runs once for the batch and every step reuses its features, as in the one loop. The model itself is never
modified: the adapted weights live only in the stack, so every call is episodic by construction.

Why this is a program of its own and not a branch inside the one loop: the loop steps ONE set of weights
in place (the model's own parameters, a `torch.optim` optimizer, per-step Python control for callbacks,
SAM's second pass, EATA/SAR sample filters, per-call rollback and continual carry-over). Here the weights
are B stacked copies outside the model, the forward is a pure function under `vmap`, Adam is functional,
and stops and rollbacks are per-image masks over the stack. Sharing the loop's body would mean a
functional rewrite of every method; what the two do share (parameter selection, the lr schedule, pixel
targets, the report) is imported from `adapt.loop`, so a recipe means the same thing in both.

Equivalence: with the same recipe, losses, steps, stops, rollbacks and adapted predictions equal the one
loop's up to floating-point summation order (batched matrix products instead of single ones); the tests
check it in float64 (tests/test_bench_adapt.py). In float32, Adam's division of each gradient by its own
magnitude lets a rounding difference in a near-zero gradient flip a step's sign, so long runs drift apart
as two thread counts do.

Execution levers (a recipe's `[execution]` table, `config.ExecutionConfig`, alias `ExecutionOptions`; all off by default; they change how the step runs, not the recipe):
`batch_size` caps how many images run together, `compile` wraps the step in `torch.compile`
("reduce-overhead" also captures it in CUDA graphs), `autocast="bf16"` runs forward and backward in
bfloat16 (weights and Adam stay float32), `adam="fused"` uses PyTorch's fused Adam kernel
(`torch.optim.Adam(fused=True)`) on the stacked weights.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tta_runtime.adapt.loop import AdaptationReport, lr_at, select_parameters
from tta_runtime.config import AdaptConfig, ExecutionConfig
from tta_runtime.errors import ConfigError
from tta_runtime.models.segmenter import SegmenterOutput, SlotSegmenter, image_targets

__all__ = ["BatchedAdapter", "ExecutionOptions", "adam_update"]

_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which the one loop uses
_EPS = 1e-8
_OUTPUT_FIELDS = ("masks", "reconstruction", "rgb", "logits", "slots", "attention")
_SUPPORTED_METHODS = ("slot_reconstruction",)


# The execution levers are a recipe's [execution] table (config.ExecutionConfig); the old name stays.
ExecutionOptions = ExecutionConfig


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(B, sum of the per-image sizes): the tensors' per-image values side by side, one copy."""
    return torch.cat([t.flatten(1) for t in tensors], dim=1)


def adam_update(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
    step: torch.Tensor, lr: torch.Tensor, weight_decay: float = 0.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One Adam update, out of place, with the arithmetic of `torch.optim.Adam`'s single-tensor path.

    `step`: the update count including this update, a float64 scalar tensor (float32 would round
    1 - 0.999**step visibly); `lr`: a scalar tensor, so a compiled step does not recompile when the
    schedule moves it. Returns new parameters, first and second moments. Element-wise, so stacked
    per-image tensors (B, *shape) get B independent Adam updates.
    """
    beta1, beta2 = _BETAS
    if weight_decay:
        grads = [g + weight_decay * p for g, p in zip(grads, params, strict=True)]
    step_size = lr / (1 - beta1**step)
    bias2_sqrt = (1 - beta2**step).sqrt()
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq, strict=True):
        m = torch.lerp(m, g, 1 - beta1)
        v = v * beta2 + (1 - beta2) * g * g
        denom = v.sqrt() / bias2_sqrt + _EPS
        new_p.append(p - step_size * m / denom)
        new_m.append(m)
        new_v.append(v)
    return new_p, new_m, new_v


class _GRUCell(nn.Module):
    """`nn.GRUCell` as plain tensor maths, same parameter names. vmap has no batching rule for the fused
    `gru_cell` kernel and would loop over the batch; written out, every gate is one batched product."""

    def __init__(self, cell: nn.GRUCell) -> None:
        super().__init__()
        self.weight_ih, self.weight_hh = cell.weight_ih, cell.weight_hh  # (3H, in), (3H, H): gates r, z, n
        self.bias_ih, self.bias_hh = cell.bias_ih, cell.bias_hh

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gi = F.linear(x, self.weight_ih, self.bias_ih)
        gh = F.linear(h, self.weight_hh, self.bias_hh)
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h


class _Functional(nn.Module):
    """The segmenter as a function of one image (no batch axis), for `functional_call` under `vmap`.

    Holds a copy of the model whose GRU cells are written out (`_GRUCell`); the copy's own tensors are
    never used, since every call passes all parameters and buffers."""

    def __init__(self, model: SlotSegmenter) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        for parent in list(self.model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.GRUCell):
                    setattr(parent, name, _GRUCell(child))

    def forward(self, x: torch.Tensor, pixel_idx: torch.Tensor | None, from_features: bool) -> tuple[torch.Tensor, ...]:
        x = x[None]  # (1, 3, S, S) image or (1, N, D) features
        out = self.model.forward_features(x, pixel_idx) if from_features else self.model(x, pixel_idx)
        return tuple(getattr(out, f)[0] for f in _OUTPUT_FIELDS)


class BatchedAdapter:
    """Adapt B images at once with one recipe, each image with its own weights (see the module docstring).

    Supports the slot segmenter with the reconstruction loss, Adam, episodic mode; every recipe lever of
    the one loop (params, pixel_fraction, lr schedule, grad_clip, early stop, optimizer_state,
    time_budget_ms, the non-finite guard) behaves as there, per image.
    """

    def __init__(
        self, model: nn.Module, cfg: AdaptConfig, *, execution: ExecutionOptions | None = None,
        training_optimizer_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(model, SlotSegmenter):
            raise ConfigError(f"batched adaptation supports slot segmenters, got {type(model).__name__}")
        if cfg.method not in _SUPPORTED_METHODS:
            raise ConfigError(f"batched adaptation supports method {_SUPPORTED_METHODS}, got {cfg.method!r}")
        if cfg.optimizer != "adam":
            raise ConfigError(f"batched adaptation has a per-image Adam only, got optimizer={cfg.optimizer!r}")
        if cfg.mode != "episodic":
            raise ConfigError("batched adaptation is episodic (each image starts from the loaded weights), got mode='continual'")
        if cfg.restore_prob > 0:
            raise ConfigError(
                f"batched adaptation has no stochastic restore (restore_prob={cfg.restore_prob:g}): it guards continual "
                "streams, and batched adaptation is episodic; set restore_prob = 0 or adapt image by image"
            )
        if cfg.optimizer_state == "training" and training_optimizer_state is None:
            raise ConfigError(
                "optimizer_state='training' needs Adam moments saved with the model, and none were given; "
                "use optimizer_state='fresh'"
            )
        self.model = model
        self.cfg = cfg
        self.execution = execution or cfg.execution or ExecutionConfig()
        self.training_optimizer_state = training_optimizer_state
        self._fn = _Functional(model)
        chosen = select_parameters(model, cfg.params)
        self.names = list(chosen)  # adapted, stacked per image
        self.frozen_encoder = not any(n.startswith("encoder.") for n in self.names)
        self._step_fn: Callable[..., tuple[torch.Tensor, ...]] | None = None

    # -- the functional pieces ---------------------------------------------------------------------
    def _state(self, adapted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Everything `functional_call` needs: adapted weights (one image's slice) over the shared rest."""
        shared = {f"model.{n}": p.detach() for n, p in self.model.named_parameters() if n not in adapted}
        shared.update({f"model.{n}": b for n, b in self.model.named_buffers()})
        shared.update({f"model.{n}": t for n, t in adapted.items()})
        return shared

    def _autocast(self, device: torch.device):  # noqa: ANN202 - a context manager
        if self.execution.autocast == "off":
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def _losses_and_grads(
        self, weights: dict[str, torch.Tensor], x: torch.Tensor, targets: torch.Tensor, pixel_idx: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-image gradients {name: (B, *shape)} and losses (B,) of the reconstruction MSE.

        `x`: images (B, 3, S, S) or, encoder frozen, features (B, N, D); `targets`: (B, P, 3)."""
        from_features = self.frozen_encoder

        def loss(w: dict[str, torch.Tensor], xb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(self._fn, self._state(w), (xb, pixel_idx, from_features))
            return F.mse_loss(out[1].to(target.dtype), target)  # out[1]: the reconstruction (P, 3); autocast may give 16 bits

        with self._autocast(x.device):
            return torch.func.vmap(torch.func.grad_and_value(loss))(weights, x, targets)

    def _step(
        self, weights: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
        x: torch.Tensor, targets: torch.Tensor, pixel_idx: torch.Tensor | None, step: torch.Tensor, lr: torch.Tensor,
    ) -> tuple[list[torch.Tensor], ...]:
        """Losses and gradients, per-image clipping, one functional Adam update (skipped for fused Adam,
        which the loop runs itself). Returns [new weights, new exp_avg, new exp_avg_sq, gradients,
        [losses (B,), gradient norms (B,)]]; a norm is non-finite when that image's gradient is."""
        grads_d, losses = self._losses_and_grads(dict(zip(self.names, weights, strict=True)), x, targets, pixel_idx)
        grads = [grads_d[n] for n in self.names]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (B,)
        if self.cfg.grad_clip is not None:  # per image, as clip_grad_norm_ on each image's parameters
            coef = (self.cfg.grad_clip / (norms + 1e-6)).clamp(max=1.0)
            grads = [g * coef.view(-1, *[1] * (g.dim() - 1)) for g in grads]
        if self.execution.adam == "fused":
            return weights, exp_avg, exp_avg_sq, grads, [losses, norms]
        new_w, new_m, new_v = adam_update(weights, grads, exp_avg, exp_avg_sq, step, lr, self.cfg.weight_decay)
        return new_w, new_m, new_v, grads, [losses, norms]

    def _compiled_step(self) -> Callable[..., tuple[list[torch.Tensor], ...]]:
        if self._step_fn is None:
            ex = self.execution
            self._step_fn = self._step if ex.compile == "off" else torch.compile(
                self._step, mode=None if ex.compile == "default" else ex.compile, backend=ex.compile_backend,
                dynamic=False,
            )
        return self._step_fn

    @torch.no_grad()
    def _predict(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> SegmenterOutput:
        """All pixels, each image with its own adapted weights: SegmenterOutput with batch axis B."""

        def forward(w: dict[str, torch.Tensor], xb: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.func.functional_call(self._fn, self._state(w), (xb, None, self.frozen_encoder))

        with self._autocast(x.device):
            out = torch.func.vmap(forward)(weights, x)
        return SegmenterOutput(*(t.to(x.dtype) for t in out))

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, images: torch.Tensor) -> tuple[SegmenterOutput, list[AdaptationReport]]:
        """Adapt on `images` (B, 3, S, S) in [0, 1], each independently, and predict with the adapted weights.

        Returns the predictions (`SegmenterOutput`, batch axis B, all pixels) and one report per image. The
        model's own weights are not modified. More than `execution.batch_size` images run in chunks of it.
        """
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 1:
            raise ConfigError(f"images must be (B, 3, S, S) with B >= 1, got shape {tuple(images.shape)}")
        b = self.execution.batch_size
        if images.shape[0] <= b:
            return self._run(images, self.cfg.steps)
        parts = [self._run(images[i : i + b], self.cfg.steps) for i in range(0, images.shape[0], b)]
        outputs = SegmenterOutput(*(torch.cat([getattr(o, f) for o, _ in parts]) for f in _OUTPUT_FIELDS))
        return outputs, [r for _, reps in parts for r in reps]

    @staticmethod
    def _fill_reports(reports: list[AdaptationReport], losses: torch.Tensor, hist: torch.Tensor, budget_stop: int | None) -> None:
        """Per-image reports from the loop's device-side history, read back once: `losses` (steps, B) and
        `hist` (4, steps, B): active, loss and gradient finite, new weights finite, stopped early (patience)."""
        # plain lists: reading a tensor element by element is one Python-level tensor op per read
        losses_l: list[list[float]] = losses.tolist()
        active, ok_pre, ok_new, stopped = hist.tolist()
        for i, r in enumerate(reports):
            for step in range(len(losses_l)):
                if not active[step][i]:
                    break
                r.losses.append(float(losses_l[step][i]))
                if ok_pre[step][i] and ok_new[step][i]:
                    r.steps_run = step + 1
                    if stopped[step][i]:
                        r.stopped_early = True
                        break
                    if step == budget_stop:
                        r.stopped_early = True
                    continue
                if not ok_pre[step][i]:
                    what = "loss" if not math.isfinite(losses_l[step][i]) else "gradient"
                    r.rolled_back, r.rollback_reason = True, f"non-finite {what} at step {step}"
                else:
                    r.rolled_back, r.rollback_reason = True, f"non-finite weights after step {step}"
                break

    def warmup(self, images: torch.Tensor, steps: int = 2) -> None:
        """A short untimed run on `images`: compiles the step (when `compile` is on) and warms the kernels."""
        self._run(images, min(steps, self.cfg.steps))

    def _run(self, images: torch.Tensor, n_steps: int) -> tuple[SegmenterOutput, list[AdaptationReport]]:
        cfg, ex = self.cfg, self.execution
        b, device = images.shape[0], images.device
        t0 = time.perf_counter()
        params = dict(self.model.named_parameters())
        chosen = {n: params[n] for n in self.names}
        reports = [
            AdaptationReport(
                recipe=cfg.name, method=cfg.method, mode=cfg.mode, params=cfg.params,
                params_adapted=sum(p.numel() for p in chosen.values()), steps_requested=cfg.steps, device=str(device),
            )
            for _ in range(b)
        ]
        weights = [p.detach().unsqueeze(0).repeat(b, *[1] * p.dim()).contiguous() for p in chosen.values()]
        if cfg.optimizer_state == "training":
            state = self.training_optimizer_state
            assert state is not None  # checked in __init__
            step0 = float(state["step"].reshape(()))
            exp_avg = [state[f"exp_avg/{n}"].to(device).expand_as(w).clone() for n, w in zip(self.names, weights, strict=True)]
            exp_avg_sq = [state[f"exp_avg_sq/{n}"].to(device).expand_as(w).clone() for n, w in zip(self.names, weights, strict=True)]
        else:
            step0 = 0.0
            exp_avg = [torch.zeros_like(w) for w in weights]
            exp_avg_sq = [torch.zeros_like(w) for w in weights]
        fused_opt = None
        if ex.adam == "fused":  # the optimizer owns `weights` and the moments and updates them in place
            fused_opt = torch.optim.Adam(weights, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
            for w, m, v in zip(weights, exp_avg, exp_avg_sq, strict=True):
                fused_opt.state[w] = {"step": torch.tensor(step0, dtype=torch.float32, device=device), "exp_avg": m, "exp_avg_sq": v}

        x = images
        if self.frozen_encoder:  # the encoder's weights are shared and fixed: run it once for the batch
            with torch.no_grad():
                x = self.model.encode(images)  # (B, N, D)
        step_fn = self._compiled_step()
        graphs = ex.compile == "reduce-overhead" and device.type == "cuda"
        for r in reports:
            r.timings["setup_s"] = time.perf_counter() - t0

        t_loop = time.perf_counter()
        # What the host knows in advance goes to the device once: every step's pixel subset (the one loop's:
        # same generator, same draws) and the lr schedule. The per-image guard and early stop run on the device
        # (their history is read back at the end), so the host waits for the GPU only every `sync_every` steps.
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        n_pix = images.shape[-1] * images.shape[-2]
        n_sub = max(1, round(n_pix * cfg.pixel_fraction))
        # (Separate tensors, not views of one: a compiled step then sees the same kind of input every step.)
        idx_all: list[torch.Tensor | None] = [None] * n_steps
        if n_sub < n_pix and n_steps:
            drawn = torch.stack([torch.randperm(n_pix, generator=gen)[:n_sub] for _ in range(n_steps)]).to(device)
            idx_all = [t.clone() for t in drawn]
        lr_host = [lr_at(cfg, s) for s in range(n_steps)]
        lrs = [t.clone() for t in torch.tensor(lr_host, dtype=torch.float64, device=device)] if n_steps else []
        full_targets = image_targets(images)  # (B, S*S, 3)
        active = torch.ones(b, dtype=torch.bool, device=device)  # images still stepping (early stop, time budget, guard)
        best = torch.full((b,), math.inf, dtype=torch.float64, device=device)
        since_best = torch.zeros(b, dtype=torch.long, device=device)
        hist_loss = torch.zeros(n_steps, b, dtype=torch.float64, device=device)
        # per step and image: was it active, were loss and gradient finite, were the new weights, did it stop early
        hist = torch.zeros(4, n_steps, b, dtype=torch.bool, device=device)
        budget_stop: int | None = None  # the step after which time_budget_ms stopped every image
        # per image: the last weights that gave a finite loss and gradient. Fused Adam updates `weights` in place
        # and the guard works on one flat (B, P) copy of them: a handful of kernels a step instead of a few per
        # parameter tensor (the one-image loop on a GPU is bound by kernel launches).
        last_good = weights
        flat_good = _flat(weights) if fused_opt is not None else None
        flat_dst = [w.view(b, -1) for w in weights]  # where a rolled-back flat copy is written back
        sizes = [t.shape[1] for t in flat_dst]
        step_t = torch.tensor(step0, dtype=torch.float64, device=device)
        n_run = 0
        for step in range(n_steps):
            idx = idx_all[step]
            targets = full_targets if idx is None else full_targets[:, idx]
            step_t = step_t + 1
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            new, new_m, new_v, grads, (losses, norms) = step_fn(
                weights, exp_avg, exp_avg_sq, x, targets, idx, step_t, lrs[step]
            )
            if graphs and fused_opt is None:  # the next replay reuses the outputs' memory: keep copies
                new, new_m, new_v = ([t.clone() for t in ts] for ts in (new, new_m, new_v))
            # (Fused Adam: the step returns its inputs and the gradients, which fused_opt.step() consumes
            # before the next replay, so nothing is copied.)
            pre = weights
            flat_pre = flat_new = None
            if fused_opt is not None:
                flat_pre = _flat(weights)  # the weights this step started from
                for w, g in zip(weights, grads, strict=True):
                    w.grad = g
                for group in fused_opt.param_groups:
                    group["lr"] = lr_host[step]
                fused_opt.step()
                for w in weights:
                    w.grad = None
                new = weights
            n_run = step + 1
            losses64 = losses.detach().double()
            ok_pre = torch.isfinite(losses64) & torch.isfinite(norms.detach())  # these weights gave finite loss and gradient
            if fused_opt is not None:
                flat_new = _flat(weights)
                ok_new = torch.isfinite(flat_new).all(1)
            else:
                ok_new = torch.stack([torch.isfinite(w.flatten(1)).all(1) for w in new]).all(0)
            accept = active & ok_pre & ok_new
            hist_loss[step] = losses64
            hist[0, step], hist[1, step], hist[2, step] = active, ok_pre, ok_new
            sync = n_run % ex.sync_every == 0 or n_run == n_steps
            if sync and bool(accept.all()):  # the common case, known on the host: every image stepped
                result, last_good, flat_good = new, pre, flat_pre
            elif fused_opt is not None:  # the same rule on the flat copies, written back into `weights`
                assert flat_pre is not None and flat_new is not None and flat_good is not None
                flat_good = torch.where((ok_pre & active)[:, None], flat_pre, flat_good)
                flat_res = torch.where(accept[:, None], flat_new, torch.where(active[:, None], flat_good, flat_pre))
                torch._foreach_copy_(flat_dst, list(torch.split(flat_res, sizes, dim=1)))
                result = new
            else:  # accepted: the update; rolled back: the last good weights; stopped before: unchanged
                def per_image(mask: torch.Tensor, a: list[torch.Tensor], b_: list[torch.Tensor]) -> list[torch.Tensor]:
                    return [torch.where(mask.view(-1, *[1] * (t.dim() - 1)), t, u) for t, u in zip(a, b_, strict=True)]

                last_good = per_image(ok_pre & active, pre, last_good)
                result = per_image(accept, new, per_image(active, last_good, pre))
            active = accept
            if fused_opt is None:  # (fused: the optimizer's tensors hold the result; moments updated in place)
                weights, exp_avg, exp_avg_sq = result, new_m, new_v
            if cfg.early_stop_patience is not None:
                improved = losses64 < best * (1 - cfg.early_stop_min_delta)
                best = torch.where(improved & active, losses64, best)
                since_best = torch.where(improved, 0, since_best + 1)
                stop = active & (since_best >= cfg.early_stop_patience)
                hist[3, step] = stop
                active = active & ~stop
            if sync:
                if cfg.time_budget_ms is not None and (time.perf_counter() - t_loop) * 1e3 >= cfg.time_budget_ms:
                    budget_stop = step
                    break
                if not bool(active.any()):
                    break
        self._fill_reports(reports, hist_loss[:n_run].cpu(), hist[:, :n_run].cpu(), budget_stop)
        t_adapt = time.perf_counter() - t_loop

        t_pred = time.perf_counter()
        final = self._predict(dict(zip(self.names, weights, strict=True)), x)
        with torch.no_grad():
            final_losses = (final.reconstruction - full_targets).pow(2).mean(dim=(1, 2)).tolist()
        t_pred = time.perf_counter() - t_pred
        total = time.perf_counter() - t0
        for i, r in enumerate(reports):
            r.final_loss = final_losses[i]
            r.timings.update({"adapt_s": t_adapt / b, "predict_s": t_pred / b, "total_s": total / b, "batch": float(b)})
        return final, reports
