"""`tta-runtime bench serve`: a bounded loopback load on a real local server, beside a direct in-process loop.

The server is `tta-runtime serve` in a child process (`tta_runtime.serve.process.ServerProcess`) on a free
loopback port; this process is the client. The run, in order:
1. start the server (optionally pinned to `cpus`, as `taskset -c` would: the child inherits this process's
   affinity at its start), send `warmup` requests per route, read its RSS and its `/metrics` counters;
2. the load: `clients` threads, each with one persistent keep-alive connection (`http.client`), send
   `requests` raw-body requests each, a share `adapt_fraction` of them to `/v1/adapt?steps=S` (the same
   count on every client, at seeded positions), the rest to `/v1/predict`; latency is measured per request
   on the client side, from sending to the last byte of the response;
3. RSS and `/metrics` again (the server's counters must match the client's counts);
4. side by side, taking turns of 50 calls so that a neighbour's load on a shared machine hits both
   alike: `serial` predict requests from one client (HTTP latency without queueing) and `direct` calls of
   `Runtime.from_pretrained(model).predict(image)` in this process, on the same image decoded once, with
   the server's torch thread count and, when pinned, its CPUs; then the server stops gracefully.

Ratios are HTTP / direct. Under load the HTTP latency includes queueing (`clients` requests share
`workers` workers), so its p50 ratio is about `clients / workers` times the one-client ratio; the
throughput ratio and the one-client latencies are the HTTP overhead proper.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import http.client
import json
import os
import random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta_runtime.decode import decode_bytes, image_format
from tta_runtime.errors import ConfigError, TTARuntimeError
from tta_runtime.evaluation.bench_backends import percentile
from tta_runtime.evaluation.common import hardware
from tta_runtime.hub import sample_image_path
from tta_runtime.serve.engine import fingerprint
from tta_runtime.serve.process import ServerProcess

__all__ = ["bench_serve", "parse_cpus"]

ROUTES = {"predict": "/v1/predict", "adapt": "/v1/adapt"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "bmp": "image/bmp"}
TURN = 50  # calls per turn when HTTP and in-process calls take turns: long enough to keep each one's caches warm
DIRECT_CAP = 500  # the direct loop's default: as many calls as one client's requests, at most this many
RSS_EVERY_S = 0.25
ENV = ("OMP_", "MKL_", "MALLOC_", "LD_PRELOAD", "PYTORCH_")  # settings that move CPU timings, recorded when set
Progress = Callable[[int, int], None]  # (requests done in all phases, their planned total)


def parse_cpus(text: str) -> list[int]:
    """A `taskset -c` CPU list ("1", "0,2", "0-3") as sorted CPU ids, each one this process may use."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), min(int(hi or lo), int(lo) + 4096) + 1))
    except ValueError:
        raise ConfigError(f"--taskset takes a CPU list like 1, 0,2 or 0-3; got {text!r}") from None
    allowed = os.sched_getaffinity(0)
    bad = sorted(cpus - allowed)
    if bad:
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise ConfigError(f"--taskset {text!r} names CPUs this process may not use ({bad[:8]}{more}); it may use "
                          f"{sorted(allowed)}")
    return sorted(cpus)


@contextlib.contextmanager
def _pinned(cpus: list[int] | None) -> Iterator[None]:
    """Run the block on `cpus` (all of this process's CPUs when None), then restore the affinity."""
    before = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _check(value: float, name: str, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be from {lo:g} to {hi:g}; got {value!r}")


def _image(path: str | os.PathLike[str] | None) -> tuple[Path, bytes, str]:
    """(path, bytes, content type) of the request image: the bundled OOD sample, or the file at `path`."""
    p = Path(path) if path is not None else sample_image_path()
    if not p.is_file():
        raise ConfigError(f"--image {str(p)!r} is not a readable regular file; give a PNG, JPEG, WebP or BMP file")
    data = p.read_bytes()
    fmt = image_format(data)
    if fmt not in CONTENT_TYPES:
        raise ConfigError(f"--image {str(p)!r} is {'a ' + fmt.upper() if fmt else 'no known'} image; the server takes "
                          f"{', '.join(f.upper() for f in CONTENT_TYPES)}")
    return p, data, CONTENT_TYPES[fmt]


def latency_stats(seconds: list[float]) -> dict[str, Any]:
    """count, mean, min, p50/p95/p99 (nearest rank) and max of `seconds`, in milliseconds."""
    if not seconds:
        return {"count": 0}
    s = sorted(seconds)
    ms = {"mean": sum(s) / len(s), "min": s[0], **{f"p{q}": percentile(s, q / 100) for q in (50, 95, 99)}, "max": s[-1]}
    return {"count": len(s), **{k: round(1e3 * v, 3) for k, v in ms.items()}}


class _Tally:
    """What the client threads measured, with the progress callback called under one lock."""

    def __init__(self, total: int, on_request: Progress | None) -> None:
        self.lock = threading.Lock()
        self.total, self.done, self.on_request = total, 0, on_request
        self.latency: dict[str, list[float]] = {k: [] for k in ROUTES}
        self.status: Counter[str] = Counter()
        self.by_route_status: Counter[tuple[str, str]] = Counter()
        self.first_error: dict[tuple[str, str], str] = {}
        self.steps_run = 0
        self.connections = 0

    def advance(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
            if self.on_request is not None:
                self.on_request(self.done, self.total)

    def record(self, kind: str, status: str, seconds: float, body: bytes) -> None:
        with self.lock:
            self.latency[kind].append(seconds)
            self.status[status] += 1
            self.by_route_status[(kind, status)] += 1
            if status != "200":
                self.first_error.setdefault((kind, status), body[:2000].decode("utf-8", "replace"))
        self.advance()


def _check_body(kind: str, data: bytes, steps: int) -> tuple[str, int]:
    """("200", adaptation steps run) for a well-formed answer, else ("invalid_body", 0)."""
    try:
        body = json.loads(data)
        adaptation = body["adaptation"]
        ok = (body["segmentation"] or body["classification"]) is not None and (adaptation is None) == (kind == "predict")
        run = 0 if adaptation is None else int(adaptation["steps_run"])
        return ("200", run) if ok and run <= steps else ("invalid_body", 0)
    except (ValueError, KeyError, TypeError):
        return "invalid_body", 0


class _Conn:
    """One client's keep-alive connection (re-opened only after a transport error); `send` records into `tally`."""

    def __init__(self, srv: ServerProcess, image: bytes, ctype: str, steps: int, tally: _Tally, timeout: float) -> None:
        self.srv, self.image, self.steps, self.tally, self.timeout = srv, image, steps, tally, timeout
        self.paths = {"predict": ROUTES["predict"], "adapt": f"{ROUTES['adapt']}?steps={steps}"}
        self.headers = {"Content-Type": ctype}
        self.conn = self._open()

    def _open(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(self.srv.host, self.srv.port, timeout=self.timeout)
        with self.tally.lock:
            self.tally.connections += 1
        with contextlib.suppress(OSError):  # else the next request connects (or records why it cannot)
            conn.connect()
        return conn

    def send(self, kind: str) -> None:
        """One request, timed from sending to the last byte of the answer; its body checked after the clock."""
        t0 = time.perf_counter()
        try:
            self.conn.request("POST", self.paths[kind], body=self.image, headers=self.headers)
            resp = self.conn.getresponse()
            data, status = resp.read(), str(resp.status)
        except (OSError, http.client.HTTPException) as e:
            data, status = f"{type(e).__name__}: {e}".encode(), "transport_error"
            self.conn.close()
            self.conn = self._open()
        dt = time.perf_counter() - t0
        if status == "200":
            status, run = _check_body(kind, data, self.steps)
            with self.tally.lock:
                self.tally.steps_run += run
        self.tally.record(kind, status, dt, data)

    def close(self) -> None:
        self.conn.close()


def _client(conn: _Conn, plan: list[str], start: threading.Barrier, ended: list[float], timeout: float) -> None:
    """One client thread: wait for the others, then send the requests of `plan` one after the other."""
    start.wait(timeout)
    try:
        for kind in plan:
            conn.send(kind)
    finally:
        conn.close()
        ended.append(time.perf_counter())


def _plans(clients: int, requests: int, adapt_fraction: float, seed: int) -> list[list[str]]:
    """Per client: `requests` route kinds, round(adapt_fraction * requests) of them 'adapt' at seeded positions."""
    n_adapt = round(adapt_fraction * requests)
    plans = []
    for c in range(clients):
        plan = ["adapt"] * n_adapt + ["predict"] * (requests - n_adapt)
        random.Random(seed * 1_000_003 + c).shuffle(plan)
        plans.append(plan)
    return plans


def _metrics(srv: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The server's /metrics samples: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, data = srv.request("GET", "/metrics")
    if status != 200:
        raise TTARuntimeError(f"GET /metrics answered {status}: {data[:200]!r}")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(data.decode()) for s in fam.samples}


def _metrics_delta(before: dict, after: dict, tally: _Tally) -> dict[str, Any]:
    """The server's own counts over the load, beside the client's: requests by route and status (which must
    agree), mean latency by route, predictions by kind and adaptation steps."""
    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    client: Counter[tuple[str, str]] = Counter()
    for (kind, status), n in tally.by_route_status.items():
        if status != "transport_error":  # no HTTP answer: the server may not have counted it
            client[(ROUTES[kind], "200" if status == "invalid_body" else status)] += n
    seen = {(dict(labels)["route"], dict(labels)["status"]) for name, labels in after
            if name == "tta_http_requests_total" and dict(labels).get("route") in ROUTES.values()}
    requests = {f"POST {route} {code}": {"client": client[(route, code)],
                                         "server": int(delta("tta_http_requests_total", route=route, method="POST",
                                                             status=code))}
                for route, code in sorted(seen | set(client))}
    mean_ms = {}
    for kind, route in ROUTES.items():
        n = delta("tta_http_request_duration_seconds_count", route=route)
        if n:
            mean_ms[kind] = round(1e3 * delta("tta_http_request_duration_seconds_sum", route=route) / n, 3)
    models = {dict(labels)["model"] for name, labels in after if name == "tta_predictions_total"}
    return {
        "requests": requests,
        "agrees_with_client": all(r["client"] == r["server"] for r in requests.values()),
        "server_mean_latency_ms": mean_ms,
        "predictions": {kind: int(sum(delta("tta_predictions_total", model=m, kind=kind) for m in models)) for kind in ROUTES},
        "adaptation_steps": int(sum(delta("tta_adaptation_steps_total", model=m) for m in models)),
        "adaptation_steps_client": tally.steps_run,
    }


def _run_clients(srv: ServerProcess, plans: list[list[str]], image: bytes, ctype: str, steps: int, tally: _Tally,
                 timeout: float) -> tuple[float, int]:
    """Every plan on its own client thread, all released at once: (wall seconds, peak sampled server RSS)."""
    start, ended = threading.Barrier(len(plans) + 1), []
    conns = [_Conn(srv, image, ctype, steps, tally, timeout) for _ in plans]  # connected before the clock starts
    threads = [threading.Thread(target=_client, args=(conn, plan, start, ended, timeout), name=f"bench-client-{i}",
                                daemon=True) for i, (conn, plan) in enumerate(zip(conns, plans))]
    for t in threads:
        t.start()
    start.wait(timeout)  # BrokenBarrierError if a client never got there
    t0 = time.perf_counter()
    rss = [srv.rss_bytes()]
    for t in threads:
        while t.is_alive():
            t.join(RSS_EVERY_S)
            with contextlib.suppress(OSError, TTARuntimeError):
                rss.append(srv.rss_bytes())
    return max(ended) - t0, max(rss)


def _summary(tally: _Tally, n: int, seconds: float, key: str = "wall_s") -> dict[str, Any]:
    """What `tally` measured over `n` requests in `seconds` (`key`: wall time, or the time spent in them)."""
    lat = tally.latency
    return {
        "requests": n,
        "by_route": {kind: len(v) for kind, v in lat.items()},
        key: round(seconds, 3),
        "throughput_rps": round(n / seconds, 3),
        "latency_ms": {"all": latency_stats(lat["predict"] + lat["adapt"]),
                       **{kind: latency_stats(v) for kind, v in lat.items() if v}},
        "status_counts": dict(sorted(tally.status.items())),
        "errors": sum(v for k, v in tally.status.items() if k != "200"),
        "error_samples": [{"route": ROUTES[k], "status": s, "count": tally.by_route_status[(k, s)], "first_body": body}
                          for (k, s), body in sorted(tally.first_error.items())],
        "connections_opened": tally.connections,
        "adaptation_steps_run": tally.steps_run,
    }


def _warm_up_as_the_server_does(rt: Any) -> None:
    """The warm-up of each server Runtime (`tta_runtime.serve.engine.Engine._load_all`): one predict and one
    1-step adaptation on a blank image. Without it, the in-process loop measured slower than the same predict
    behind HTTP on the shared 2-core machine of docs/benchmarks.md (the cause was not pinned down)."""
    blank = np.zeros((rt.input_size, rt.input_size, 3), np.uint8)
    rt.predict(blank)
    rt.adapt_and_predict(blank, steps=1)  # episodic: the weights are restored bit-exact


def _side_by_side(srv: ServerProcess, model: str | None, image: bytes, ctype: str, serial: int, direct: int,
                  warmup: int, threads: int, cpus: list[int] | None, tally: _Tally,
                  timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """`Runtime.from_pretrained(model).predict(image)` `direct` times in this process (the image decoded once,
    as the server decodes it: BGR) and `serial` predict requests from one client, taking turns of `TURN`
    calls while both last, so that a neighbour's load on a shared machine hits both alike. This process runs the
    phase with `threads` torch threads on `cpus`; the server is idle while a direct call runs.
    Throughputs are calls / the seconds spent in them. Returns (serial report, direct report)."""
    from tta_runtime.runtime import Runtime

    array, order, _ = decode_bytes(image, 1 << 28, "the bench image")
    one = _Tally(serial, None)
    one.advance = tally.advance  # type: ignore[method-assign]  # one progress count over every phase

    def call() -> float:
        t = time.perf_counter()
        rt.predict(array, channel_order=order)
        return time.perf_counter() - t

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # predict runs on one worker thread, as in the server: on the 2-core CPU machine of docs/benchmarks.md
        # the same call on the main thread measured 0-24% slower (7 interleaved runs, one torch thread)
        with _pinned(cpus), concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-direct") as worker:
            rt = Runtime.from_pretrained(model)
            worker.submit(_warm_up_as_the_server_does, rt).result()
            conn = _Conn(srv, image, ctype, 0, one, timeout)
            for _ in range(warmup):
                worker.submit(call).result()
                tally.advance()
            times: list[float] = []
            for lo in range(0, max(serial, direct), TURN):
                for _ in range(max(0, min(TURN, serial - lo))):
                    conn.send("predict")
                for _ in range(max(0, min(TURN, direct - lo))):
                    times.append(worker.submit(call).result())
                    tally.advance()
            conn.close()
            used = worker.submit(torch.get_num_threads).result()
    finally:
        torch.set_num_threads(before)
    serial_report = _summary(one, serial, sum(one.latency["predict"]), "busy_s") if serial else {"requests": 0}
    return serial_report, {
        "model": rt.name, "weights_fingerprint": fingerprint(rt.model), "requests": direct, "warmup_requests": warmup,
        "torch_threads": used, "cpus": cpus, "busy_s": round(sum(times), 3),
        "throughput_rps": round(direct / sum(times), 3), "latency_ms": latency_stats(times),
    }


def _ratios(http: dict[str, Any], direct: dict[str, Any], route: str = "predict") -> dict[str, float | None]:
    """HTTP / direct for p50, p99 (of `route`) and throughput."""
    lat, d = http.get("latency_ms", {}).get(route), direct["latency_ms"]
    if not lat or not d.get("count"):
        return {"p50": None, "p99": None, "throughput": None}
    return {"p50": round(lat["p50"] / d["p50"], 3), "p99": round(lat["p99"] / d["p99"], 3),
            "throughput": round(http["throughput_rps"] / direct["throughput_rps"], 3)}


def _server_log_tail(log: Path, n: int = 2000) -> str:
    try:
        return log.read_bytes()[-n:].decode("utf-8", "replace").strip()
    except OSError:
        return ""


def bench_serve(
    model: str | None = None, *, clients: int = 8, requests: int = 500, adapt_fraction: float = 0.0, steps: int = 5,
    workers: int = 1, threads: int | None = None, cpus: list[int] | None = None, image: str | os.PathLike[str] | None = None,
    direct: int | None = None, serial: int | None = None, warmup: int = 10, timeout: float = 120.0, seed: int = 0,
    on_request: Progress | None = None, command: str | None = None,
) -> dict[str, Any]:
    """Load a local server with `clients` x `requests` requests; then time one-client requests and `predict` in
    this process, taking turns (see the module docstring).

    `model`: a model name or folder (None: the default shipped model); `adapt_fraction`: share of each
    client's requests sent to /v1/adapt with `steps` steps; `workers`: the server's worker threads;
    `threads`: torch threads of the server and of the direct loop (default: CPUs // workers, the server's
    own default); `cpus`: CPU ids the server and the direct loop are pinned to (default: unpinned);
    `image`: a PNG/JPEG/WebP/BMP path (default: the bundled OOD sample); `direct`: in-process predict calls
    (default: min(requests, 500)); `serial`: one-client predict requests after the load (default: as
    `direct`; 0: none); `warmup`: untimed requests per route before RSS is first read (and direct-loop
    calls before timing); `timeout`: the server's per-request deadline and the client's socket timeout;
    `seed`: where the adapt requests fall in each client's sequence; `on_request(done, total)`: called after every request of every phase, from one
    thread at a time. Returns the report (see docs/benchmarks.md, "Serving over HTTP").
    """
    _check(clients, "clients (--clients)", 1, 256)
    _check(requests, "requests per client (--requests)", 1, 1_000_000)
    _check(adapt_fraction, "adapt_fraction (--adapt-fraction)", 0, 1)
    _check(steps, "steps (--steps)", 0, 1000)
    _check(workers, "workers (--workers)", 1, 64)
    _check(warmup, "warmup", 0, 10_000)
    direct = min(requests, DIRECT_CAP) if direct is None else direct
    serial = direct if serial is None else serial
    _check(direct, "direct-loop calls (--direct)", 1, 1_000_000)
    _check(serial, "serial requests (--serial)", 0, 1_000_000)
    if cpus is not None:
        cpus = parse_cpus(",".join(map(str, cpus)))
    n_cpus = len(cpus) if cpus is not None else len(os.sched_getaffinity(0))
    threads = threads if threads is not None else max(1, n_cpus // workers)
    _check(threads, "threads (--threads)", 1, 256)
    path, data, ctype = _image(image)
    decoded, _, _ = decode_bytes(data, 1 << 28, f"--image {str(path)!r}")
    plans = _plans(clients, requests, adapt_fraction, seed)
    kinds = ["predict"] + (["adapt"] if adapt_fraction > 0 else [])
    total = warmup * len(kinds) + clients * requests + serial + warmup + direct
    tally = _Tally(total, on_request)
    max_queue = max(16, clients)  # every client may wait: the bench measures service, not 429 backpressure
    args = ["--workers", str(workers), "--threads", str(threads), "--max-queue", str(max_queue),
            "--max-steps", str(max(steps, 1)), "--timeout", str(timeout)] + (["--model", model] if model else [])
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="tta-bench-serve-") as tmp:
        log = Path(tmp) / "server.log"
        srv = ServerProcess(args, log=log, ready_timeout=300)
        t_start = time.perf_counter()
        try:
            with _pinned(cpus):  # the child inherits the affinity, as under `taskset -c`
                srv.start()
        except TTARuntimeError as e:
            raise TTARuntimeError(f"{e}; its log ends: {_server_log_tail(log)}") from None
        try:
            start_s = time.perf_counter() - t_start
            _, models = srv.json("GET", "/v1/models")
            served = next(m for m in models["models"] if m["default"])
            for kind in kinds:  # untimed, on fresh connections
                for _ in range(warmup):
                    code, _, body = srv.request("POST", ROUTES[kind] + (f"?steps={steps}" if kind == "adapt" else ""),
                                                data, {"Content-Type": ctype}, timeout)
                    if code != 200:
                        raise TTARuntimeError(f"a warm-up request to {ROUTES[kind]} answered {code}: {body[:500]!r}")
                    tally.advance()
            rss_before = srv.rss_bytes()
            metrics_before = _metrics(srv)
            wall, rss_peak = _run_clients(srv, plans, data, ctype, steps, tally, timeout)
            rss_after = srv.rss_bytes()
            metrics = _metrics_delta(metrics_before, _metrics(srv), tally)
            load = _summary(tally, clients * requests, wall)
            serial_report, direct_report = _side_by_side(srv, model, data, ctype, serial, direct, warmup, threads, cpus,
                                                         tally, timeout)
            allowed = _allowed_cpus(srv)
        finally:
            exit_status = srv.stop()
    return {
        "benchmark": "serve",
        "command": command,
        "timestamp": stamp,
        "settings": {
            "model": served["name"], "clients": clients, "requests_per_client": requests, "adapt_fraction": adapt_fraction,
            "adapt_requests_per_client": plans[0].count("adapt"), "steps": steps, "workers": workers, "threads": threads,
            "cpus": cpus, "max_queue": max_queue, "warmup_requests_per_route": warmup, "direct_requests": direct,
            "serial_requests": serial, "timeout_s": timeout, "seed": seed,
            "image": {"path": str(image) if image is not None else f"{path.name} (the bundled sample)", "bytes": len(data), "content_type": ctype, "shape": list(decoded.shape)},
        },
        "machine": hardware(torch.device("cpu")) | {"torch_threads": threads,
                                                    "env": {k: v for k, v in os.environ.items() if k.startswith(ENV)}},
        "server": {"args": ["tta-runtime", "serve", "--host", srv.host, "--port", str(srv.port), *args],
                   "start_s": round(start_s, 3), "cpus_allowed": allowed, "exit_status": exit_status,
                   "weights_fingerprint": served["weights_fingerprint"][0], "workers": served["workers"]},
        "load": load,
        "rss": {"before_bytes": rss_before, "after_bytes": rss_after, "peak_sampled_bytes": rss_peak,
                "growth_mb": round((rss_after - rss_before) / 2**20, 3), "sampled_every_s": RSS_EVERY_S},
        "metrics": metrics,
        "serial": serial_report,
        "direct": direct_report,
        "same_weights": direct_report["weights_fingerprint"] == served["weights_fingerprint"][0],
        "ratios": {"load_vs_direct": _ratios(load, direct_report), "serial_vs_direct": _ratios(serial_report, direct_report)},
        "errors": load["errors"] + serial_report.get("errors", 0),
    }


def _allowed_cpus(srv: ServerProcess) -> str | None:
    """The server process's `Cpus_allowed_list` (Linux /proc), as taskset would show it."""
    try:
        for line in Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines():  # type: ignore[union-attr]
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
