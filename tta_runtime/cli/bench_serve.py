"""`tta-runtime bench serve`: HTTP load on a local server beside an in-process predict loop
(`tta_runtime.evaluation.bench_serve`). Prints a short table; `--json PATH|-` writes or prints the report."""

from __future__ import annotations

import argparse
from typing import Any

from tta_runtime.cli.common import command_line, echo, step_bar, write_json


def add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model name or folder (default: the default shipped model)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, one keep-alive connection each")
    p.add_argument("--requests", type=int, default=500, help="requests per client")
    p.add_argument("--adapt-fraction", type=float, default=0.0,
                   help="share of each client's requests sent to /v1/adapt (0..1; the rest: /v1/predict)")
    p.add_argument("--steps", type=int, default=5, help="adaptation steps of each /v1/adapt request (0..1000)")
    p.add_argument("--workers", type=int, default=1, help="the server's worker threads")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the server and of the in-process loop (default: CPUs // workers)")
    p.add_argument("--taskset", default=None, metavar="CPUS",
                   help="pin the server and the in-process loop to these CPUs (as `taskset -c CPUS`: 1, 0,2, 0-3); "
                   "the clients stay unpinned")
    p.add_argument("--image", default=None, help="request image (PNG, JPEG, WebP, BMP; default: the bundled OOD sample)")
    p.add_argument("--direct", type=int, default=None, help="in-process predict calls (default: min(--requests, 500))")
    p.add_argument("--serial", type=int, default=None,
                   help="one-client predict requests after the load: latency without queueing (default: as --direct; 0: none)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed requests per route before the load (and in-process calls before timing)")
    g = p.add_argument_group("Ray Serve (extra `ray`): the same load against 1, 2, ... worker replicas in one run")
    g.add_argument("--ray", action="store_true", help="deploy on a local Ray cluster instead of one local server")
    g.add_argument("--replicas", default="1,2", help="replica counts to load in turn (default 1,2)")
    g.add_argument("--num-cpus", type=float, default=1.0, help="CPUs (and torch threads) per replica")
    g.add_argument("--cluster-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: this machine's)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    if args.ray:
        return _serve_ray(args)
    from tta_runtime.evaluation.bench_serve import bench_serve, parse_cpus

    cpus = parse_cpus(args.taskset) if args.taskset is not None else None
    on_request = _request_bar(args, "bench serve")
    report = bench_serve(
        args.model, clients=args.clients, requests=args.requests, adapt_fraction=args.adapt_fraction, steps=args.steps,
        workers=args.workers, threads=args.threads, cpus=cpus, image=args.image, direct=args.direct, serial=args.serial,
        warmup=args.warmup, on_request=on_request, command=command_line(args),
    )
    echo(args, *summary_lines(report))
    write_json(args, report)
    return 0


def _request_bar(args: argparse.Namespace, desc: str) -> Any:
    """`on_request(done, total)` moving one progress bar, which starts with the first request (after the server is up)."""
    bar = None

    def on_request(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = step_bar(args, total, desc) or (lambda step, out: None)
        bar(done, None)

    return on_request


def _row(name: str, r: dict[str, Any], lat: dict[str, Any] | None) -> str:
    if not lat or not lat.get("count"):
        return f"{name:22}{r['requests']:>8}{'-':>10}"
    return (f"{name:22}{lat['count']:>8}{r['throughput_rps']:>10.1f}{lat['p50']:>9.2f}{lat['p95']:>9.2f}"
            f"{lat['p99']:>9.2f}{lat['max']:>9.2f}")


def summary_lines(report: dict[str, Any]) -> list[str]:
    s, load, rss, m = report["settings"], report["load"], report["rss"], report["metrics"]
    lines = [
        f"{s['model']}: {s['clients']} clients x {s['requests_per_client']} requests ({s['adapt_requests_per_client']} "
        f"adapt each, {s['steps']} steps), server {s['workers']} worker(s), {s['threads']} thread(s)"
        + (f", CPUs {report['server']['cpus_allowed']}" if s["cpus"] is not None else ""),
        f"{'':22}{'requests':>8}{'req/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}",
    ]
    lines += [_row(f"HTTP load, {kind}", load, load["latency_ms"].get(kind)) for kind in ("all", "predict", "adapt")
              if kind in load["latency_ms"] and (kind != "all" or len(load["latency_ms"]) > 2)]
    if report["serial"]["requests"]:
        lines.append(_row("HTTP serial, predict", report["serial"], report["serial"]["latency_ms"].get("predict")))
    lines.append(_row("in-process predict", report["direct"], report["direct"]["latency_ms"]))
    for name, r in report["ratios"].items():
        if r["p50"] is not None:
            lines.append(f"HTTP / in-process ({name.split('_')[0]}): p50 {r['p50']:.2f}x, p99 {r['p99']:.2f}x, "
                         f"throughput {r['throughput']:.2f}x")
    codes = ", ".join(f"{k}: {v}" for k, v in load["status_counts"].items())
    lines.append(f"status {codes}; errors {report['errors']}; wall {load['wall_s']:.1f} s; server RSS "
                 f"{rss['before_bytes'] / 2**20:.1f} -> {rss['after_bytes'] / 2**20:.1f} MiB "
                 f"(peak sampled {rss['peak_sampled_bytes'] / 2**20:.1f}); /metrics "
                 + ("agrees" if m["agrees_with_client"] else "DISAGREES") + " with the client's counts")
    for e in load["error_samples"]:
        lines.append(f"  {e['count']} x {e['status']} on {e['route']}, first body: {e['first_body'][:300]}")
    return lines


def _serve_ray(args: argparse.Namespace) -> int:
    from tta_runtime.cli.common import numbers
    from tta_runtime.device import optional_import
    from tta_runtime.evaluation.bench_serve_ray import bench_serve_ray

    replicas = numbers(args.replicas, "--replicas", int, 1, 64)
    optional_import("ray.serve", "pip install 'tta-runtime[ray]'", "`bench serve --ray`")
    report = bench_serve_ray(
        args.model, replicas=replicas, clients=args.clients, requests=args.requests, adapt_fraction=args.adapt_fraction,
        steps=args.steps, num_cpus=args.num_cpus, cluster_cpus=args.cluster_cpus, image=args.image,
        on_request=_request_bar(args, "bench serve --ray"), command=command_line(args),
    )
    s = report["settings"]
    lines = [f"{s['model']} on Ray Serve: {s['clients']} clients x {s['requests_per_client']} requests "
             f"({s['adapt_requests_per_client']} adapt each, {s['steps']} steps), {s['num_cpus_per_replica']:g} CPU per replica",
             f"{'replicas':>8}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}{'vs first':>10}"]
    for n, r in report["runs"].items():
        lat = r["latency_ms"]["all"]
        lines.append(f"{n:>8}{r['throughput_rps']:>10.2f}{lat['p50']:>10.1f}{lat['p99']:>10.1f}{r['errors']:>8}"
                     f"{report['throughput_vs_first'][n]:>9.2f}x")
    echo(args, *lines)
    write_json(args, report)
    return 0
