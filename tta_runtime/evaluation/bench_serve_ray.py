"""`tta-runtime bench serve --ray --replicas 1,2`: the same HTTP load against the app on Ray Serve with 1, 2, ...
worker replicas, in one run on one local Ray cluster.

The cluster (`cluster_cpus` CPUs, loopback) starts once. For each replica count the app is (re)deployed with
that many worker replicas (`num_cpus` each, torch threads = num_cpus), warmed up with untimed requests, and
loaded by the clients of `tta_runtime.evaluation.bench_serve`: `clients` threads, one keep-alive connection
each, `requests` each, a share `adapt_fraction` of them to /v1/adapt. Reported per count: throughput,
latency percentiles, status counts, which replicas answered, and the replicas' resident memory. The scaling
figure is the throughput with N replicas over the throughput with the first count.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from tta_runtime.errors import ConfigError, TTARuntimeError
from tta_runtime.evaluation.bench_serve import ROUTES, Progress, _check, _image, _plans, _run_clients, _summary, _Tally
from tta_runtime.evaluation.common import hardware
from tta_runtime.serve.process import ServerProcess, free_port

__all__ = ["bench_serve_ray"]


class _Proxy(ServerProcess):
    """Ray Serve's HTTP proxy on host:port, spoken to with `ServerProcess`'s HTTP helpers; its "RSS" is that of
    the worker replica processes together."""

    def rss_bytes(self) -> int:
        total = 0
        for proc in Path("/proc").iterdir():  # Ray titles its replica processes "ray::ServeReplica:<app>:<deployment>"
            try:
                if b"ServeReplica:" in (proc / "cmdline").read_bytes() and b":tta-worker" in (proc / "cmdline").read_bytes():
                    status = (proc / "status").read_text()
                    total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                continue
        return total


def bench_serve_ray(
    model: str | None = None, *, replicas: list[int] = (1, 2), clients: int = 8, requests: int = 10,  # type: ignore[assignment]
    adapt_fraction: float = 1.0, steps: int = 20, num_cpus: float = 1.0, cluster_cpus: int | None = None,
    max_batch_size: int = 8, warmup: int = 2, timeout: float = 300.0, seed: int = 0, image: str | os.PathLike[str] | None = None,
    on_request: Progress | None = None, command: str | None = None,
) -> dict[str, Any]:
    """The load of `bench_serve` against 1, 2, ... worker replicas on one local Ray cluster (see the module
    docstring). `cluster_cpus`: CPUs the local cluster offers (default: this machine's)."""
    from tta_runtime.serve import ray_app
    from tta_runtime.serve.settings import RaySettings, ServeSettings

    if not replicas or any(not isinstance(n, int) or n < 1 or n > 64 for n in replicas):
        raise ConfigError(f"--replicas takes replica counts 1..64, e.g. 1,2; got {replicas}")
    _check(clients, "clients (--clients)", 1, 256)
    _check(requests, "requests per client (--requests)", 1, 1_000_000)
    _check(adapt_fraction, "adapt_fraction (--adapt-fraction)", 0, 1)
    _check(steps, "steps (--steps)", 0, 1000)
    cluster_cpus = cluster_cpus or len(os.sched_getaffinity(0))
    path, data, ctype = _image(image)
    plans = _plans(clients, requests, adapt_fraction, seed)
    kinds = ["predict"] + (["adapt"] if adapt_fraction > 0 else [])
    settings = ServeSettings(models=(model,) if model else ServeSettings().models, max_steps=max(steps, 1),
                             timeout_s=timeout, max_queue=max(16, clients))
    port = free_port()
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    runs: dict[str, Any] = {}
    total = len(replicas) * (clients * requests + warmup * len(kinds) * max(replicas))
    done_before = 0
    t0 = time.perf_counter()
    ray_app.start(settings, RaySettings(replicas=replicas[0], num_cpus=num_cpus, max_batch_size=max_batch_size),
                  port=port, num_cpus=cluster_cpus)
    start_s = time.perf_counter() - t0
    proxy = _Proxy(port=port)
    try:
        for n in replicas:
            rs = RaySettings(replicas=n, num_cpus=num_cpus, max_batch_size=max_batch_size,
                             max_ongoing_requests=max(8, clients), max_queued_requests=-1)
            t_deploy = time.perf_counter()
            ray_app.deploy(settings, rs)
            _wait(proxy, n, rs, timeout)
            deploy_s = time.perf_counter() - t_deploy
            tally = _Tally(total, None if on_request is None else lambda d, t, b=done_before: on_request(b + d, total))
            seen: Counter[str] = Counter()
            for kind in kinds:  # untimed: every replica's first forward and backward
                for _ in range(warmup * n):
                    code, headers, body = proxy.request("POST", ROUTES[kind] + (f"?steps={steps}" if kind == "adapt" else ""),
                                                        data, {"Content-Type": ctype}, timeout)
                    if code != 200:
                        raise TTARuntimeError(f"a warm-up request to {ROUTES[kind]} with {n} replica(s) answered {code}: {body[:300]!r}")
                    seen[headers.get("x-replica-id", "?")] += 1
                    tally.advance()
            rss_before = proxy.rss_bytes()
            wall, _ = _run_clients(proxy, plans, data, ctype, steps, tally, timeout)
            rss_after = proxy.rss_bytes()
            done_before = tally.done
            runs[str(n)] = {**_summary(tally, clients * requests, wall), "deploy_s": round(deploy_s, 2),
                            "replicas_answering_warmup": len(seen), "threads_per_replica": max(1, int(num_cpus)),
                            "replicas_rss_bytes": {"before": rss_before, "after": rss_after}}
    finally:
        ray_app.stop()
    base = runs[str(replicas[0])]["throughput_rps"]
    return {
        "benchmark": "serve_ray",
        "command": command,
        "timestamp": stamp,
        "settings": {"model": settings.models[0], "replicas": list(replicas), "clients": clients, "requests_per_client": requests,
                     "adapt_fraction": adapt_fraction, "adapt_requests_per_client": plans[0].count("adapt"), "steps": steps,
                     "num_cpus_per_replica": num_cpus, "cluster_cpus": cluster_cpus, "max_batch_size": max_batch_size,
                     "warmup_requests_per_route_and_replica": warmup, "timeout_s": timeout, "seed": seed,
                     "image": {"path": str(image) if image is not None else f"{path.name} (the bundled sample)",
                               "bytes": len(data), "content_type": ctype}},
        "machine": hardware(torch.device("cpu")),
        "cluster_start_s": round(start_s, 2),
        "runs": runs,
        "throughput_vs_first": {n: round(r["throughput_rps"] / base, 3) for n, r in runs.items()},
        "errors": sum(r["errors"] for r in runs.values()),
    }


def _wait(proxy: _Proxy, n: int, rs: Any, timeout: float) -> None:
    """Until exactly `n` worker replicas run and the app answers /readyz."""
    from tta_runtime.serve import ray_app

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(ray_app.replica_actors(rs)) == n and proxy.request("GET", "/readyz", timeout=10)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TTARuntimeError(f"{n} replica(s) were not ready within {timeout:g} s: {json.dumps(ray_app.replica_actors(rs))}")
