"""Prometheus metrics of one server (`/metrics`): requests by route and status, latency histograms,
adaptation steps, OOD-flagged inputs, sessions and the queue. A registry of its own per app, so that two
apps in one process (tests) never share counters."""

from __future__ import annotations

from typing import Any

from tta_runtime.device import optional_import

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine: Any) -> None:
        prom = optional_import("prometheus_client", "pip install 'tta-runtime[serve]'", "The HTTP server's /metrics")
        self._prom = prom
        self.registry = r = prom.CollectorRegistry()
        self.requests = prom.Counter("tta_http_requests", "HTTP requests answered, by route, method and status",
                                     ["route", "method", "status"], registry=r)
        self.latency = prom.Histogram("tta_http_request_duration_seconds", "time from request to response, by route",
                                      ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.predictions = prom.Counter("tta_predictions", "images answered, by model and kind (predict | adapt)",
                                        ["model", "kind"], registry=r)
        self.adapt_steps = prom.Counter("tta_adaptation_steps", "gradient steps run by adaptation, by model",
                                        ["model"], registry=r)
        self.ood_flagged = prom.Counter("tta_ood_flagged", "inputs the calibrated OOD scorer flagged, by model",
                                        ["model"], registry=r)
        if getattr(engine, "sessions", None) is not None:  # sessions held in this process (not by Ray replicas)
            sessions = prom.Gauge("tta_sessions_active", "continual sessions held", registry=r)
            sessions.set_function(lambda: len(engine.sessions))
            ended = prom.Gauge("tta_sessions_ended", "sessions dropped since start, by reason (evicted | expired)",
                               ["reason"], registry=r)
            ended.labels("evicted").set_function(lambda: engine.sessions.evicted)
            ended.labels("expired").set_function(lambda: engine.sessions.expired)
        inflight = prom.Gauge("tta_requests_in_flight", "requests running or queued for a worker", registry=r)
        inflight.set_function(lambda: engine.in_flight)
        ready = prom.Gauge("tta_ready", "1 when every model is loaded and warmed up", registry=r)
        ready.set_function(lambda: float(engine.ready))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def answered(self, body: dict[str, Any], kind: str) -> None:
        model = body["model"]
        self.predictions.labels(model, kind).inc()
        if body.get("adaptation"):
            self.adapt_steps.labels(model).inc(body["adaptation"]["steps_run"])
        if body["ood"]["is_ood"]:
            self.ood_flagged.labels(model).inc()

    def render(self) -> tuple[bytes, str]:
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
