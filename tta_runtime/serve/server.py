"""The embedded single-machine server: the app under uvicorn, with a graceful shutdown that drains requests."""

from __future__ import annotations

from typing import Any

from tta_runtime.device import optional_import
from tta_runtime.serve.settings import ServeSettings


def run(settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        **uvicorn_options: Any) -> None:
    """Serve until SIGINT/SIGTERM; then stop taking connections and let open requests finish (at most the
    request timeout) before the workers stop."""
    uvicorn = optional_import("uvicorn", "pip install 'tta-runtime[serve]'", "The HTTP server")
    from tta_runtime.serve.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False,
        timeout_graceful_shutdown=int(settings.timeout_s) + 1, **uvicorn_options,
    )
    uvicorn.Server(config).run()
