"""The work behind the HTTP routes: a pool of Runtimes per model, worker threads with backpressure and a
deadline, continual sessions, and the response bodies.

Each of the `workers` threads borrows one episodic Runtime per request from its model's pool (as many
Runtimes as workers, so a worker never waits for one); a session's frames run on that session's own
continual Runtime instead. At most `workers + max_queue` requests are in flight: the next one is refused
(429) at once rather than queued without bound. A request past its deadline answers 504; its adaptation, if
it started, stops at the next step and leaves the weights as they were before the request.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tta_runtime.errors import TTARuntimeError
from tta_runtime.hub import find_model, list_recipes, load_card
from tta_runtime.serve.images import decode_image
from tta_runtime.serve.sessions import SessionStore
from tta_runtime.serve.settings import ServeError, ServeSettings

log = logging.getLogger(__name__)

STREAM_RECIPE = {"segmentation": "slot_tta_stream", "classification": None}  # None: the card's default, continual
RETRY_AFTER_S = 1
SESSION_GRACE_S = 30.0  # a session frame past its deadline: time for the worker to stop at its next step


class Cancelled(Exception):
    """The request's deadline passed while it was queued or adapting."""


@dataclass
class Loaded:
    """One model: its folder, card and pool of episodic Runtimes."""

    name: str
    folder: Any
    card: Any
    pool: queue.Queue[Any]
    runtimes: list[Any]


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over a model's state (names, dtypes, shapes and bytes, in name order): equal iff bit-exact."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def default_threads(workers: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


class Engine:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.models: dict[str, Loaded] = {}
        self.recipes = list_recipes()
        self.sessions = SessionStore(settings.max_sessions, settings.session_ttl_s)
        self.ready = False
        self.failed: str | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="tta-worker")
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._loader: threading.Thread | None = None
        self.replica: str | None = None  # set where several replicas serve (Ray Serve): answered as X-Replica-Id

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Load and warm up every model in a background thread: /healthz answers meanwhile, /readyz says 503."""
        torch.set_num_threads(self.settings.threads or default_threads(self.settings.workers))
        self._loader = threading.Thread(target=self._load_all, name="tta-loader", daemon=True)
        self._loader.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.ready

    def _load_all(self) -> None:
        from tta_runtime.runtime import Runtime

        try:
            for name in self.settings.models:
                folder = find_model(name)
                card = load_card(folder)
                runtimes = [Runtime.from_pretrained(folder, device=self.settings.device, max_pixels=self.settings.max_pixels,
                                                    threads=self.settings.threads, trust_code=self.settings.trust_code)
                            for _ in range(self.settings.workers)]
                if self.settings.warmup:  # the first forward and backward of a process are slow: not on a client's time
                    blank = np.zeros((card.preprocessing.size, card.preprocessing.size, 3), np.uint8)
                    for rt in runtimes:
                        rt.predict(blank)
                        rt.adapt_and_predict(blank, steps=1)  # episodic: the weights are restored bit-exact
                pool: queue.Queue[Any] = queue.Queue()
                for rt in runtimes:
                    pool.put(rt)
                if card.name in self.models:
                    raise ServeError(500, "duplicate_model", f"two models are named {card.name!r}")
                self.models[card.name] = Loaded(card.name, folder, card, pool, runtimes)
                log.info("loaded %s (%s, %d worker runtimes)", card.name, card.task, len(runtimes))
            self.ready = True
        except Exception as e:  # the server stays up and says why on /readyz
            self.failed = f"{type(e).__name__}: {e}"
            log.error("loading the models failed: %s", self.failed)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    # -- requests ----------------------------------------------------------------------------------
    async def run(self, job: Any, *args: Any, grace: float = 0.0) -> Any:
        """Run `job(deadline, *args)` on a worker thread: 429 when the queue is full, 504 past the deadline.

        `grace`: how long past the deadline to wait for the worker itself to give up (raising `Cancelled` at
        its next step): a continual session's frame must answer 504 only if its state was left as it was."""
        deadline = time.monotonic() + self.settings.timeout_s
        with self._count_lock:
            if self._in_flight >= self.settings.workers + self.settings.max_queue:
                raise ServeError(429, "queue_full", f"{self._in_flight} requests are in flight ({self.settings.workers} "
                                 f"worker(s) + a queue of {self.settings.max_queue}); retry after {RETRY_AFTER_S} s",
                                 headers={"Retry-After": str(RETRY_AFTER_S)})
            self._in_flight += 1
        try:
            fut = self._executor.submit(job, deadline, *args)
        except RuntimeError:  # shutting down
            self._done(None)
            raise ServeError(503, "shutting_down", "the server is shutting down; retry on another instance",
                             headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        fut.add_done_callback(self._done)  # when the work ends, even after its request timed out
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.settings.timeout_s + grace)
        except (asyncio.TimeoutError, Cancelled):
            raise ServeError(504, "timeout", f"the request did not finish within {self.settings.timeout_s:g} s "
                             "(--timeout); ask for fewer steps, or retry when the server is less busy") from None

    async def submit(self, data: bytes, where: str, opts: dict[str, Any], adapt: bool, session_id: str | None) -> dict[str, Any]:
        """One request's response body (see `work`), on a worker within the limits (see `run`)."""
        return await self.run(self.work, data, where, opts, adapt, session_id, grace=0.0 if session_id is None else SESSION_GRACE_S)

    async def describe(self) -> dict[str, Any]:
        """The body of GET /v1/models (weights hashed on a thread: the event loop keeps answering)."""
        return {"models": await asyncio.to_thread(self.models_info), "recipes": self.recipes, "sessions": len(self.sessions),
                "max_sessions": self.settings.max_sessions, "max_steps": self.settings.max_steps}

    async def drop_session(self, session_id: str) -> bool:
        return self.sessions.drop(session_id)

    def _done(self, _: Any) -> None:
        with self._count_lock:
            self._in_flight -= 1

    def model(self, name: str | None) -> Loaded:
        if name is None:
            return self.models[self.default_model]
        found = self.models.get(name)
        if found is None:
            raise ServeError(422, "unknown_model", f"no model {name!r} is loaded here; loaded: {sorted(self.models)} "
                             "(GET /v1/models)", field="model")
        return found

    def work(self, deadline: float, data: bytes, where: str, opts: dict[str, Any], adapt: bool,
             session_id: str | None) -> dict[str, Any]:
        """One request on a worker thread (decoding included, so that the event loop never decodes): the
        response body without its request_id."""
        if time.monotonic() > deadline:
            raise Cancelled()
        loaded = self.model(opts.get("model"))
        image = decode_image(data, self.settings.max_pixels, where)
        call = self._adapt_options(opts, loaded.card.task, session=session_id is not None) if adapt else {}
        if adapt:
            def on_step(step: int, out: Any) -> None:
                if time.monotonic() > deadline:
                    raise Cancelled()
            call["on_step"] = on_step
        if session_id is None:
            rt = loaded.pool.get_nowait()  # as many runtimes as workers: one is always free here
            try:
                res = rt.adapt_and_predict(image, channel_order="bgr", **call) if adapt else rt.predict(image, channel_order="bgr")
                return self._body(rt, loaded, res, opts)
            finally:
                loaded.pool.put(rt)
        session, status = self.sessions.open(session_id, loaded.name, lambda: self._session_runtime(loaded))
        if not session.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise Cancelled()  # earlier frames of this session held it past this one's deadline
        try:
            rt = session.runtime
            if adapt:
                call.setdefault("seed", session.frames)  # new pixel subsets every frame, reproducibly
                res = rt.adapt_and_predict(image, channel_order="bgr", **call)
            else:
                res = rt.predict(image, channel_order="bgr")
            session.frames += 1
            body = self._body(rt, loaded, res, opts)
            body["session"] = {"id": session.id, "status": status, "frame": session.frames}
            return body
        finally:
            session.lock.release()

    def work_batch(self, deadline: float, items: list[tuple[bytes, str, dict[str, Any]]], adapt: bool = False) -> list[Any]:
        """Several requests without a session, run together: predicts in one forward pass per model; episodic
        adaptations (`adapt`) of a segmenter whose recipe has an `[execution]` section at once, each image with
        its own weights (`adapt.batched`), grouped by their options. One body, or the `ServeError` of that
        request, per item; each matches its request run alone within float tolerance."""
        if time.monotonic() > deadline:
            raise Cancelled()
        out: list[Any] = [None] * len(items)
        groups: dict[tuple[str, str], list[tuple[int, np.ndarray]]] = {}
        calls: dict[tuple[str, str], dict[str, Any]] = {}
        for i, (data, where, opts) in enumerate(items):
            try:
                loaded = self.model(opts.get("model"))
                call = self._adapt_options(opts, loaded.card.task) if adapt else {}
                key = (loaded.name, repr(sorted(call.items())))
                calls[key] = call
                groups.setdefault(key, []).append((i, decode_image(data, self.settings.max_pixels, where)))
            except ServeError as e:
                out[i] = e
            except TTARuntimeError as e:
                out[i] = runtime_error_status(e)
        for key, members in groups.items():
            loaded, call = self.models[key[0]], calls[key]
            rt = loaded.pool.get_nowait()
            run = (lambda x: rt.adapt_and_predict(x, channel_order="bgr", **call)) if adapt else \
                (lambda x: rt.predict(x, channel_order="bgr"))
            try:
                try:
                    results = run([image for _, image in members])
                except TTARuntimeError:  # one bad image: answer each on its own, so the others still succeed
                    results = [None] * len(members)
                for (i, image), res in zip(members, results):
                    try:
                        res = res if res is not None else run(image)
                        out[i] = self._body(rt, loaded, res, items[i][2])
                        out[i]["batched"] = len(members)
                    except TTARuntimeError as e:
                        out[i] = runtime_error_status(e)
            finally:
                loaded.pool.put(rt)
        return out

    def batchable_adapt(self, opts: dict[str, Any]) -> bool:
        """Whether an episodic adapt request may join others (`work_batch`): a segmenter whose recipe (the
        request's or the runtime's) has an `[execution]` section. A classifier's batch would share batch
        statistics, so its requests are never batched."""
        loaded = self.model(opts.get("model"))
        if loaded.card.task != "segmentation":
            return False
        name = opts.get("recipe")
        if name is not None and name not in self.recipes:
            return False  # refused with its own message on the one-by-one path
        from tta_runtime.hub import load_recipe

        recipe = load_recipe(name) if name is not None else loaded.runtimes[0].recipe
        return recipe.execution is not None and recipe.mode == "episodic"

    def _adapt_options(self, opts: dict[str, Any], task: str, session: bool = False) -> dict[str, Any]:
        call = {k: opts[k] for k in ("steps", "lr", "recipe", "adapt") if opts.get(k) is not None}
        if "recipe" in call and call["recipe"] not in self.recipes:
            raise ServeError(422, "unknown_recipe", f"no recipe {call['recipe']!r}; shipped recipes: {self.recipes}",
                             field="recipe")
        if "recipe" in call and not session:
            from tta_runtime.hub import load_recipe

            if load_recipe(call["recipe"]).mode == "continual":  # would carry one client's weights to the next
                raise ServeError(422, "continual_needs_session", f"recipe {call['recipe']!r} is continual: its "
                                 "adapted state must live in a session; send an X-Session-Id header (or use an "
                                 "episodic recipe)", field="recipe")
        if call.get("steps", 0) > self.settings.max_steps:
            raise ServeError(422, "too_many_steps", f"steps={call['steps']} is more than this server's max_steps = "
                             f"{self.settings.max_steps} (--max-steps)", field="steps")
        return call

    def _session_runtime(self, loaded: Loaded) -> Any:
        from tta_runtime.runtime import Runtime
        from tta_runtime.video import DEFAULT_STEPS_PER_FRAME

        recipe = STREAM_RECIPE[loaded.card.task] or loaded.card.default_recipe
        extra = {"steps": DEFAULT_STEPS_PER_FRAME} if loaded.card.task == "segmentation" else {}
        return Runtime.from_pretrained(loaded.folder, device=self.settings.device, max_pixels=self.settings.max_pixels,
                                       recipe=recipe, mode="continual", threads=self.settings.threads,
                                       trust_code=self.settings.trust_code, **extra)

    def _body(self, rt: Any, loaded: Loaded, res: Any, opts: dict[str, Any]) -> dict[str, Any]:
        from tta_runtime.visual import encode_png

        cal = rt.calibration
        body: dict[str, Any] = {
            "model": loaded.name, "task": res.task, "image_size": list(res.image.shape[:2]),
            "ood": {"score": _finite(res.ood_score), "scorer": res.ood_scorer, "is_ood": res.is_ood,
                    "threshold": None if cal is None else float(cal.threshold)},
            "adaptation": None if res.adaptation is None else _adaptation(res.adaptation),
            "segmentation": None, "classification": None, "overlay_png": None, "session": None,
            "timings": {k: float(v) for k, v in res.timings.items()}, "replica": self.replica, "batched": None,
        }
        if res.task == "segmentation":
            from tta_runtime.result_io import label_png

            seg = res.segmentation
            areas = np.bincount(seg.ravel(), minlength=res.num_slots) / seg.size
            body["segmentation"] = {
                "width": int(seg.shape[1]), "height": int(seg.shape[0]), "num_slots": res.num_slots,
                "slots_used": int((areas > 0).sum()), "slot_areas": [round(float(a), 6) for a in areas],
                "label_map_png": _b64(label_png(res)), "recon_mse": _finite(res.recon_mse),
            }
            if opts.get("overlay"):
                body["overlay_png"] = _b64(encode_png(res.overlay()))
        else:
            probs = res.probs
            order = np.argsort(-probs, kind="stable")[: opts.get("top_k", 5)]
            names = loaded.card.labels
            body["classification"] = {
                "label": res.label, "label_name": res.label_name, "confidence": float(probs[res.label]),
                "top_k": [{"label": int(i), "name": names[i] if i < len(names) else "", "prob": float(probs[i])} for i in order],
                "probs": [float(p) for p in probs],
            }
            if opts.get("overlay"):
                from tta_runtime.visual import panel

                body["overlay_png"] = _b64(encode_png(panel([(f"{res.label_name or res.label} p={probs[res.label]:.2f}", res.image)])))
        return body

    def models_info(self) -> list[dict[str, Any]]:
        out = []
        for name, m in self.models.items():
            seg = m.card.segmenter
            out.append({
                "name": name, "task": m.card.task, "input_size": m.card.preprocessing.size, "default": name == self.default_model,
                "default_recipe": m.card.default_recipe, "default_steps": m.runtimes[0].recipe.steps, "num_slots": None if seg is None else seg.num_slots,
                "labels": list(m.card.labels), "calibrated": m.runtimes[0].calibration is not None, "workers": len(m.runtimes),
                "weights_fingerprint": [_locked_fingerprint(rt) for rt in m.runtimes],
            })
        return out


def _locked_fingerprint(rt: Any) -> str:
    """The runtime's weights fingerprint, read between requests (never mid-adaptation); "busy" if it stays busy."""
    if not rt._lock.acquire(timeout=5.0):
        return "busy"
    try:
        return fingerprint(rt.model)
    finally:
        rt._lock.release()


def _adaptation(rep: Any) -> dict[str, Any]:
    return {
        "recipe": rep.recipe, "method": rep.method, "mode": rep.mode, "steps_requested": rep.steps_requested,
        "steps_run": rep.steps_run, "losses": [_finite(v) for v in rep.losses],
        "final_loss": None if rep.final_loss is None else _finite(rep.final_loss), "stopped_early": rep.stopped_early,
        "rolled_back": rep.rolled_back, "rollback_reason": rep.rollback_reason, "skipped": rep.skipped,
        "reset": rep.reset, "time_s": float(rep.timings.get("total_s", 0.0)),
    }


def _finite(v: float) -> float | None:
    """JSON has no NaN or Inf: such a value is null."""
    v = float(v)
    return v if np.isfinite(v) else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def runtime_error_status(e: TTARuntimeError) -> ServeError:
    """A runtime's own error raised by a request (bad overrides, an image it cannot take): 422."""
    return ServeError(422, type(e).__name__, str(e))
