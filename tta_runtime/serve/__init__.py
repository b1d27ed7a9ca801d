"""Serving: one ASGI app (FastAPI, extra `serve`) over a pool of Runtimes, and the embedded uvicorn server.

    from tta_runtime.serve import ServeSettings, create_app
    app = create_app(ServeSettings(models=["slot-flat-64", "digits-cnn-bn"], workers=2))
    # uvicorn.run(app, host="127.0.0.1", port=8000)  -- or `tta-runtime serve`

Routes: `POST /v1/predict`, `POST /v1/adapt` (an image as multipart upload, raw body or base64 JSON),
`GET /v1/models`, `/healthz`, `/readyz`, `/metrics` (Prometheus), `/` (a page to try it), `/docs` and
`/openapi.json`. docs/serve.md describes every field, limit and status code.

`import tta_runtime.serve` needs neither FastAPI nor uvicorn; `create_app` and `run` raise
`MissingExtraError` naming the `serve` extra when they are missing.
"""

from __future__ import annotations

from typing import Any

from tta_runtime.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "run"]


def create_app(settings: ServeSettings | None = None) -> Any:
    """The FastAPI app (see `tta_runtime.serve.app.create_app`)."""
    from tta_runtime.serve.app import create_app as _create

    return _create(settings or ServeSettings())


def run(settings: ServeSettings | None = None, *, host: str = "127.0.0.1", port: int = 8000, **uvicorn_options: Any) -> None:
    """Serve the app with uvicorn until SIGINT/SIGTERM (see `tta_runtime.serve.server.run`)."""
    from tta_runtime.serve.server import run as _run

    _run(settings or ServeSettings(), host=host, port=port, **uvicorn_options)
