"""What a server is configured with (`ServeSettings`), and the errors it answers with (`ServeError`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from tta_runtime.config import MAX_STEPS, _Frozen
from tta_runtime.hub import DEFAULT_MODEL
from tta_runtime.inputs import DEFAULT_MAX_PIXELS


class ServeSettings(_Frozen):
    """A server's models, pool, limits and sessions. Every limit answers with a JSON 4xx (docs/serve.md)."""

    models: tuple[str, ...] = Field(
        (DEFAULT_MODEL,), min_length=1, max_length=16,
        description="model names or folders to load; the first is the default for requests that name none",
    )
    device: str = Field("cpu", description="device of every Runtime ('cpu', 'cuda', 'cuda:1', 'mps')")
    workers: int = Field(1, ge=1, le=64, description="worker threads, each with its own Runtime of every model")
    threads: int | None = Field(
        None, ge=1, le=256, description="intra-op threads per request; None = each Runtime's own choice from the "
        "work size, shared between the workers busy at the moment, so that together they never oversubscribe the machine",
    )
    max_queue: int = Field(16, ge=0, le=10_000, description="requests waiting for a worker beyond the busy ones; past it: 429")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="per-request deadline (queue + work); past it: 504")
    max_body_bytes: int = Field(20 << 20, ge=1024, le=1 << 30, description="largest request body; past it: 413")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, le=1 << 28, description="largest image (H*W, read from its header "
                            "before decoding); past it: 413")
    max_steps: int = Field(1000, ge=0, le=MAX_STEPS, description="largest `steps` a request may ask for; past it: 422")
    max_sessions: int = Field(32, ge=0, le=10_000, description="continual sessions kept (LRU eviction past it); 0 = none")
    session_ttl_s: float = Field(600.0, gt=0, le=7 * 86400, description="a session idle this long is dropped")
    warmup: bool = Field(True, description="run one predict per Runtime before /readyz says ready")
    trust_code: bool = Field(False, description="let a model folder whose card names Python code (a user's own "
                             "module) run it; off: such a folder is refused, nothing of it imported")

    @field_validator("models", mode="before")
    @classmethod
    def _list_is_tuple(cls, v: Any) -> Any:  # a JSON or YAML list (Serve configs) is the tuple of names
        return tuple(v) if isinstance(v, list) else v


class RaySettings(_Frozen):
    """How the app is laid out on Ray Serve (`tta_runtime.serve.ray_app`): worker replicas, their resources,
    batching, health checks and autoscaling."""

    replicas: int = Field(2, ge=1, le=1024, description="worker replicas (each a process with its own Runtimes and sessions)")
    num_cpus: float = Field(1.0, ge=0, le=1024, description="CPUs reserved per replica (also its torch threads, at least 1)")
    num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs per replica; fractions share one GPU (e.g. 0.5: two replicas a GPU)")
    max_batch_size: int = Field(8, ge=1, le=1024, description="predict requests gathered into one forward pass (1 = no batching)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10, description="how long a batch waits to fill")
    # Load per replica: past max_ongoing_requests requests wait in Serve's queue, past that queue they get 429.
    max_ongoing_requests: int = Field(8, ge=1, le=10_000)
    max_queued_requests: int = Field(64, ge=-1, le=100_000, description="-1 = unbounded")
    # Serve calls each replica's check_health (its models loaded) this often, and restarts a failing one.
    health_check_period_s: float = Field(5.0, gt=0, le=3600)
    health_check_timeout_s: float = Field(60.0, gt=0, le=3600)
    # Autoscaling (off by default: `replicas` fixed): between min and max replicas, aiming at this load per replica.
    autoscale: bool = False
    min_replicas: int = Field(1, ge=0, le=1024)
    max_replicas: int = Field(4, ge=1, le=1024)
    target_ongoing_requests: float = Field(2.0, gt=0, le=10_000)
    app_name: str = Field("tta-runtime", pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class ServeError(Exception):
    """An answer other than 200: HTTP `status`, a short `kind` ("payload_too_large", ...), a `message` saying
    what was received, what is expected and how to fix it, and optionally the request `field` at fault."""

    def __init__(self, status: int, kind: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.field = status, kind, message, field
        self.headers = headers or {}

    def __reduce__(self) -> Any:  # picklable with its fields (Ray carries it from a replica to the front)
        return (_rebuild, (self.status, self.kind, self.message, self.field, self.headers))

    def body(self, request_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {"status": self.status, "type": self.kind, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error, "request_id": request_id}


def _rebuild(status: int, kind: str, message: str, field: str | None, headers: dict[str, str]) -> ServeError:
    return ServeError(status, kind, message, field=field, headers=headers)
