"""Scale out on Ray Serve: the same HTTP app in front of worker replicas (extra `ray`).

    front (1 replica, the app of `tta_runtime.serve.app`: routes, limits, errors, page, /metrics)
      -> tta-worker (N replicas: an `Engine` each, i.e. Runtimes, worker threads and continual sessions)

The front runs `create_app` unchanged over a `RemoteEngine`, which forwards each request to a worker replica
through a Serve handle. The front is an ingress deployment (`serve.ingress`).
- **Sticky sessions.** A request with `X-Session-Id` is sent with the session id as its multiplexed model id
  (`serve.multiplexed`), so Serve routes every frame of a session to the replica that holds its state.
- **Replica loss.** A named registry actor remembers each session's replica. If that replica dies, the
  session restarts from the loaded weights on another replica, and the response says so
  ("restarted_on_another_replica").
- **Dead replicas.** A request in flight on a replica that dies is answered with a 503 JSON error, so the
  client knows to retry.
- **Batching.** `serve.batch` gathers concurrent predict requests into one forward pass per model
  (`RaySettings.max_batch_size`, `batch_wait_timeout_s`). It also gathers episodic adapt requests to a
  segmenter whose recipe has an `[execution]` section (e.g. `recipe=slot_tta_batched`): they are adapted at
  once, each image with its own weights. Other adapt requests run one by one.

Only this module imports Ray. `app_builder(args)` is the import path that a Serve config names
(`tta-runtime serve --ray --config-out serve.yaml`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from typing import Any

import ray
from ray import serve

from tta_runtime.errors import ConfigError, TTARuntimeError
from tta_runtime.serve.engine import Engine, runtime_error_status
from tta_runtime.serve.settings import RaySettings, ServeError, ServeSettings

log = logging.getLogger(__name__)

WORKER = "tta-worker"
FRONT = "tta-front"
MAX_STICKY = 4096  # session ids Serve remembers per replica for routing; the Engine's own LRU bounds the state
REGISTRY_SIZE = 100_000


@ray.remote(num_cpus=0)
class SessionRegistry:
    """Which replica holds each session (bounded, oldest forgotten first)."""

    def __init__(self) -> None:
        self.homes: OrderedDict[str, str] = OrderedDict()

    def claim(self, session_id: str, replica: str) -> str | None:
        """Make `replica` the session's home; "elsewhere" when another replica held it before."""
        before = self.homes.pop(session_id, None)
        self.homes[session_id] = replica
        while len(self.homes) > REGISTRY_SIZE:
            self.homes.popitem(last=False)
        return "elsewhere" if before not in (None, replica) else None


class Worker:
    """One worker replica: an `Engine` (its Runtimes and sessions), batching and a health check."""

    def __init__(self, settings: str, ray_settings: str) -> None:  # JSON: strict models read lists as tuples there
        self.ray_settings = RaySettings.model_validate_json(ray_settings)
        self.engine = Engine(ServeSettings.model_validate_json(settings))
        self.engine.replica = serve.get_replica_context().replica_id.unique_id
        registry = SessionRegistry.options(  # type: ignore[attr-defined]
            name=f"{self.ray_settings.app_name}-sessions", namespace="tta-runtime", get_if_exists=True, lifetime="detached",
        ).remote()
        self.engine.sessions.claim = lambda sid: ray.get(registry.claim.remote(sid, self.engine.replica))
        for batch in (self._predict_batch, self._adapt_batch):
            batch.set_max_batch_size(self.ray_settings.max_batch_size)
            batch.set_batch_wait_timeout_s(self.ray_settings.batch_wait_timeout_s)
        self.engine.start()
        # Serve routes to a replica once its constructor returns: not before its models are loaded and warm.
        if not self.engine.wait_ready() and self.engine.failed:
            raise RuntimeError(f"the models failed to load: {self.engine.failed}")

    async def check_health(self) -> None:
        """The replica's readiness (models loaded and warmed up): Serve restarts a replica that fails it."""
        if not self.engine.ready:
            raise RuntimeError(f"not ready: {self.engine.failed or 'models not loaded'}")

    async def ready(self) -> dict[str, Any]:
        return {"ready": self.engine.ready, "failed": self.engine.failed,
                "models": list(self.engine.models) if self.engine.ready else [], "recipes": self.engine.recipes}

    async def describe(self) -> dict[str, Any]:
        return {**await self.engine.describe(), "sessions": None}

    async def drop_session(self, session_id: str) -> bool:
        await self._session(session_id)
        return await self.engine.drop_session(session_id)

    async def submit(self, data: bytes, where: str, opts: dict[str, Any], adapt: bool, session_id: str | None) -> dict[str, Any]:
        if session_id is not None:
            await self._session(session_id)  # tells Serve's router that this replica holds the session
        elif self.ray_settings.max_batch_size > 1 and (not adapt or self.engine.batchable_adapt(opts)):
            out = await (self._adapt_batch if adapt else self._predict_batch)((data, where, opts))
            if isinstance(out, Exception):
                raise out
            return out
        return await self.engine.submit(data, where, opts, adapt, session_id)

    @serve.multiplexed(max_num_models_per_replica=MAX_STICKY)
    async def _session(self, session_id: str) -> str:
        return session_id

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _predict_batch(self, items: list[tuple[bytes, str, dict[str, Any]]]) -> list[Any]:
        return await self.engine.run(self.engine.work_batch, items)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _adapt_batch(self, items: list[tuple[bytes, str, dict[str, Any]]]) -> list[Any]:
        return await self.engine.run(self.engine.work_batch, items, True)


class RemoteEngine:
    """What the app needs of an engine, answered by the worker replicas through a Serve handle."""

    sessions = None  # held by the replicas

    def __init__(self, settings: ServeSettings, handle: Any) -> None:
        self.settings, self.handle = settings, handle
        self.ready, self.failed = False, None
        self.models: dict[str, None] = {}
        self.recipes: list[str] = []
        self.in_flight = 0
        self._poller: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._wait_ready())

    async def _wait_ready(self) -> None:
        while not self.ready:
            try:
                r = await self.handle.ready.remote()
                self.failed = r["failed"]
                if r["ready"]:
                    self.models, self.recipes, self.ready = dict.fromkeys(r["models"]), r["recipes"], True
            except Exception as e:  # replicas still starting
                log.debug("workers not ready yet: %s", e)
            await asyncio.sleep(0.5)

    def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    def model(self, name: str | None) -> None:
        if name is not None and name not in self.models:
            raise ServeError(422, "unknown_model", f"no model {name!r} is loaded here; loaded: {sorted(self.models)} "
                             "(GET /v1/models)", field="model")

    async def submit(self, data: bytes, where: str, opts: dict[str, Any], adapt: bool, session_id: str | None) -> dict[str, Any]:
        handle = self.handle.options(multiplexed_model_id=session_id) if session_id else self.handle
        return await self._call(handle.submit.remote(data, where, opts, adapt, session_id))

    async def describe(self) -> dict[str, Any]:
        return await self._call(self.handle.describe.remote())

    async def drop_session(self, session_id: str) -> bool:
        return await self._call(self.handle.options(multiplexed_model_id=session_id).drop_session.remote(session_id))

    async def _call(self, response: Any) -> Any:
        """Await a replica's answer: its own errors as they are, a lost replica as 503, Serve's queue limit as 429."""
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        async def wait() -> Any:
            return await response

        self.in_flight += 1
        try:
            return await asyncio.wait_for(wait(), self.settings.timeout_s + 5)
        except asyncio.TimeoutError:
            response.cancel()
            raise ServeError(504, "timeout", f"no replica answered within {self.settings.timeout_s:g} s (--timeout)") from None
        except BackPressureError as e:
            raise ServeError(429, "queue_full", f"every replica is busy and Serve's queue is full ({e}); retry after 1 s",
                             headers={"Retry-After": "1"}) from None
        except DeploymentUnavailableError as e:
            raise ServeError(503, "unavailable", f"no worker replica is available ({e}); retry shortly",
                             headers={"Retry-After": "1"}) from None
        except Exception as e:
            cause = getattr(e, "cause", e)
            if isinstance(cause, ServeError):
                raise ServeError(cause.status, cause.kind, cause.message, field=cause.field, headers=cause.headers) from None
            if isinstance(cause, TTARuntimeError):
                raise runtime_error_status(cause) from None
            if isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
                raise ServeError(503, "replica_lost", "the replica serving this request stopped before it answered; retry "
                                 "(a session on it restarts from the loaded weights, and its next response says so)",
                                 headers={"Retry-After": "1"}) from None
            raise
        finally:
            self.in_flight -= 1


@serve.ingress()
class Front:
    """The ingress replica: the app of `tta_runtime.serve.app`, over a `RemoteEngine`."""

    def __init__(self, worker: Any, settings: str) -> None:
        self.worker, self.settings = worker, ServeSettings.model_validate_json(settings)

    def __serve_build_asgi_app__(self) -> Any:
        from tta_runtime.serve.app import create_app

        return create_app(self.settings, RemoteEngine(self.settings, self.worker))


def _check_gpus(settings: ServeSettings, ray_settings: RaySettings) -> None:
    if ray_settings.num_gpus > 0 and not settings.device.startswith("cuda"):
        raise ConfigError(f"num_gpus={ray_settings.num_gpus:g} reserves GPUs for each replica, but the models run on "
                          f"device {settings.device!r}: pass --device cuda as well")


def build(settings: ServeSettings, ray_settings: RaySettings) -> Any:
    """The Serve application (front + workers) for `serve.run`."""
    _check_gpus(settings, ray_settings)
    r = ray_settings
    threads = settings.threads or max(1, int(r.num_cpus))  # a replica's share of the machine, not all its cores
    worker_settings = settings.model_copy(update={"threads": threads}).model_dump_json()
    options: dict[str, Any] = {
        "name": WORKER, "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
        "max_ongoing_requests": r.max_ongoing_requests, "max_queued_requests": r.max_queued_requests,
        "health_check_period_s": r.health_check_period_s, "health_check_timeout_s": r.health_check_timeout_s,
    }
    if r.autoscale:
        options["autoscaling_config"] = {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                                         "target_ongoing_requests": r.target_ongoing_requests}
    else:
        options["num_replicas"] = r.replicas
    worker = serve.deployment(Worker, **options).bind(worker_settings, r.model_dump_json())
    front = serve.deployment(Front, name=FRONT, num_replicas=1, ray_actor_options={"num_cpus": 0},
                             max_ongoing_requests=10_000)
    return front.bind(worker, settings.model_dump_json())


def app_builder(args: dict[str, Any]) -> Any:
    """The Serve config entry point: `import_path: tta_runtime.serve.ray_app:app_builder`, `args: {serve: {...},
    ray: {...}}` (the fields of `ServeSettings` and `RaySettings`)."""
    import json

    from pydantic import ValidationError

    from tta_runtime.config import format_validation_error

    unknown = set(args) - {"serve", "ray"}
    if unknown:
        raise TTARuntimeError(f"unknown Serve config args {sorted(unknown)}; expected 'serve' and 'ray'")
    try:
        return build(ServeSettings.model_validate_json(json.dumps(args.get("serve", {}))),
                     RaySettings.model_validate_json(json.dumps(args.get("ray", {}))))
    except ValidationError as e:
        raise TTARuntimeError(format_validation_error(e, "Serve config args")) from None


def config(settings: ServeSettings, ray_settings: RaySettings, *, host: str, port: int) -> dict[str, Any]:
    """A Serve config (`serve run FILE`, `serve deploy FILE`) that deploys `app_builder` with these settings."""
    _check_gpus(settings, ray_settings)
    r = ray_settings
    worker: dict[str, Any] = {"name": WORKER, "ray_actor_options": {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus},
                              "max_ongoing_requests": r.max_ongoing_requests, "health_check_period_s": r.health_check_period_s}
    if r.autoscale:
        worker["autoscaling_config"] = {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                                        "target_ongoing_requests": r.target_ongoing_requests}
    else:
        worker["num_replicas"] = r.replicas
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": r.app_name, "route_prefix": "/", "import_path": "tta_runtime.serve.ray_app:app_builder",
            "args": {"serve": settings.model_dump(mode="json"), "ray": r.model_dump(mode="json")},
            "deployments": [worker],
        }],
    }


def start(settings: ServeSettings, ray_settings: RaySettings, *, host: str = "127.0.0.1", port: int = 8000,
          address: str | None = None, num_cpus: int | None = None) -> Any:
    """Start (or join, with `address`) a Ray cluster, start Serve's HTTP proxy on host:port and deploy; returns
    the front's handle. `num_cpus`: the CPUs a new local cluster offers (default: all)."""
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=bool(os.environ.get("TTA_RAY_LOG")), logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port})
    return deploy(settings, ray_settings)


def deploy(settings: ServeSettings, ray_settings: RaySettings) -> Any:
    """(Re)deploy the app on the running Serve instance (e.g. with another replica count); the front's handle."""
    return serve.run(build(settings, ray_settings), name=ray_settings.app_name, route_prefix="/", blocking=False)


def stop() -> None:
    serve.shutdown()
    if ray.is_initialized():
        ray.shutdown()


def replica_actors(ray_settings: RaySettings | None = None) -> list[str]:
    """Names of the live worker replica actors (to inspect or kill them: `ray.get_actor(name, namespace="serve")`)."""
    app = (ray_settings or RaySettings()).app_name
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and f"{app}#{WORKER}#" in a["name"])
