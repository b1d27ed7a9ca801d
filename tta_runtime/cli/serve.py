"""`tta-runtime serve`: the HTTP app on the embedded uvicorn server (`tta_runtime.serve`)."""

from __future__ import annotations

import argparse

from tta_runtime.cli.common import echo


def add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None, metavar="M",
                   help="model name or folder to load; repeat for several (the first is the default); "
                   "default: the default shipped model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="worker threads, each with its own Runtime per model")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per request (default: chosen from the work size, shared between busy workers)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-queue", type=int, default=None, help="requests waiting beyond the busy workers (past it: 429)")
    p.add_argument("--timeout", type=float, default=None, help="per-request deadline in seconds (past it: 504)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (past it: 413)")
    p.add_argument("--max-pixels", type=int, default=None, help="largest image, H*W from its header (past it: 413)")
    p.add_argument("--max-steps", type=int, default=None, help="largest `steps` a request may ask for (past it: 422)")
    p.add_argument("--max-sessions", type=int, default=None, help="continual sessions kept, LRU-evicted past it (0: none)")
    p.add_argument("--session-ttl", type=float, default=None, help="seconds an idle session is kept")
    p.add_argument("--trust-code", action="store_true",
                   help="let a model folder whose card names Python code (your own module) run it")
    g = p.add_argument_group("Ray Serve (extra `ray`): the same app in front of worker replicas")
    g.add_argument("--ray", action="store_true", help="deploy on Ray Serve (starts a local Ray cluster, or joins --address)")
    g.add_argument("--address", default=None, help="an existing Ray cluster to join (e.g. 'auto' or 'ray://head:10001')")
    g.add_argument("--replicas", type=int, default=None, help="worker replicas (default 2)")
    g.add_argument("--num-cpus", type=float, default=None, help="CPUs per replica (default 1; also its torch threads)")
    g.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica; fractions share a GPU (e.g. 0.5)")
    g.add_argument("--max-batch-size", type=int, default=None, help="predict requests batched into one forward pass (default 8)")
    g.add_argument("--batch-wait", type=float, default=None, help="seconds a batch waits to fill (default 0.01)")
    g.add_argument("--autoscale", action="store_true", help="autoscale replicas between --min-replicas and --max-replicas")
    g.add_argument("--min-replicas", type=int, default=None)
    g.add_argument("--max-replicas", type=int, default=None)
    g.add_argument("--target-ongoing", type=float, default=None, help="autoscaling target of ongoing requests per replica")
    g.add_argument("--config-out", default=None, metavar="FILE.yaml",
                   help="write a Serve config for `serve run FILE` / `serve deploy FILE` instead of serving")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from tta_runtime.config import validate
    from tta_runtime.errors import ConfigError
    from tta_runtime.serve import ServeSettings, run

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    given = {
        "models": tuple(args.model) if args.model else None, "workers": args.workers, "threads": args.threads,
        "device": args.device, "max_queue": args.max_queue, "timeout_s": args.timeout,
        "max_body_bytes": args.max_body_bytes, "max_pixels": args.max_pixels, "max_steps": args.max_steps,
        "max_sessions": args.max_sessions, "session_ttl_s": args.session_ttl, "trust_code": args.trust_code or None,
    }
    settings = validate(ServeSettings, {k: v for k, v in given.items() if v is not None}, "serve options")
    if args.ray or args.config_out:
        return _serve_ray(args, settings)
    echo(args, f"serving {', '.join(settings.models)} on http://{args.host}:{args.port}/ "
         f"({settings.workers} worker(s); the page at /, the API at /docs; Ctrl-C stops after open requests finish)")
    level = "info" if getattr(args, "verbose", False) else "error" if getattr(args, "quiet", False) else "warning"
    run(settings, host=args.host, port=args.port, log_level=level)
    return 0


def _serve_ray(args: argparse.Namespace, settings: object) -> int:
    import time

    from tta_runtime.config import validate
    from tta_runtime.device import optional_import
    from tta_runtime.files import atomic_write
    from tta_runtime.serve.settings import RaySettings

    given = {
        "replicas": args.replicas, "num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
        "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait, "autoscale": args.autoscale or None,
        "min_replicas": args.min_replicas, "max_replicas": args.max_replicas, "target_ongoing_requests": args.target_ongoing,
    }
    ray_settings = validate(RaySettings, {k: v for k, v in given.items() if v is not None}, "Ray Serve options")
    optional_import("ray.serve", "pip install 'tta-runtime[ray]'", "`tta-runtime serve --ray`")
    from tta_runtime.serve import ray_app

    if args.config_out:
        yaml = optional_import("yaml", "pip install 'tta-runtime[ray]'", "Writing a Serve config")
        text = yaml.safe_dump(ray_app.config(settings, ray_settings, host=args.host, port=args.port), sort_keys=False)  # type: ignore[arg-type]
        atomic_write(args.config_out, text.encode(), "Serve config")
        echo(args, f"wrote {args.config_out}: run it with `serve run {args.config_out}` (or `serve deploy` on a running cluster)")
        return 0
    echo(args, f"starting Ray Serve: {ray_settings.replicas} worker replica(s) of {', '.join(settings.models)} "  # type: ignore[attr-defined]
         f"on http://{args.host}:{args.port}/ (Ctrl-C stops)")
    ray_app.start(settings, ray_settings, host=args.host, port=args.port, address=args.address)  # type: ignore[arg-type]
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        ray_app.stop()
    return 0
