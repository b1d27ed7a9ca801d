"""The ASGI app: routes, the request pipeline (limits -> options -> worker -> JSON) and its error answers.

Every answer other than 200 is JSON `{"error": {"status", "type", "message", "field"?}, "request_id"}`:
a client's mistake is a 4xx naming what was received and what is expected; a fault of the server is a 500
whose request id is also in the log. Every response carries `X-Request-Id`.
"""

import contextlib
import logging
import re
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from pydantic import ValidationError

from tta_runtime.device import optional_import
from tta_runtime.errors import TTARuntimeError
from tta_runtime.serve import schemas
from tta_runtime.serve.engine import RETRY_AFTER_S, Engine, runtime_error_status
from tta_runtime.serve.images import ACCEPTED, image_and_options, read_body
from tta_runtime.serve.metrics import Metrics
from tta_runtime.serve.sessions import check_session_id
from tta_runtime.serve.settings import ServeError, ServeSettings

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_ADAPT_ONLY = ("steps", "lr", "recipe", "adapt")
_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
_INSTALL = "pip install 'tta-runtime[serve]'"


def create_app(settings: ServeSettings, engine: Any = None) -> Any:
    """The app over `engine` (default: an `Engine` of `settings` in this process; `tta_runtime.serve.ray_app`
    passes one that forwards to Ray Serve replicas)."""
    fastapi = optional_import("fastapi", _INSTALL, "The HTTP server")
    optional_import("multipart", _INSTALL, "Multipart uploads to the HTTP server")
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    from tta_runtime import __version__

    engine = engine if engine is not None else Engine(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.shutdown()  # uvicorn has stopped taking requests and drained the open ones

    app = fastapi.FastAPI(
        title="tta-runtime", version=__version__, lifespan=lifespan,
        description="Test-time adaptation as a service: predict, adapt per image or per session, OOD scores. "
        "Errors are JSON: {\"error\": {\"status\", \"type\", \"message\", \"field\"}, \"request_id\"}.",
    )
    app.state.engine = engine
    app.state.metrics = metrics = Metrics(engine)

    def error_response(request: Any, err: ServeError) -> Any:
        return JSONResponse(err.body(_request_id(request)), status_code=err.status, headers=err.headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Any, err: ServeError) -> Any:
        return error_response(request, err)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Any, err: Any) -> Any:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        message = {404: f"no route {request.url.path!r}; see /docs for the API",
                   405: f"{request.method} is not allowed on {request.url.path!r}"}.get(err.status_code, str(err.detail))
        return error_response(request, ServeError(err.status_code, kind, message, headers=dict(err.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Any, err: Any) -> Any:
        return error_response(request, _invalid(err.errors()))

    @app.middleware("http")
    async def _pipeline(request: Any, call_next: Any) -> Any:
        rid = request.headers.get("x-request-id", "")
        request.state.request_id = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # a fault of ours: logged with the request id, answered as a JSON 500
            log.exception("request %s (%s %s) failed", request.state.request_id, request.method, request.url.path)
            response = error_response(request, ServeError(
                500, "internal_error", f"the server failed on this request; report request id {request.state.request_id}"))
        route = request.scope.get("route")
        method = request.method if request.method in _METHODS else "OTHER"  # a bounded label set, whatever clients send
        metrics.observe(getattr(route, "path", "unmatched"), method, response.status_code, time.perf_counter() - t0)
        response.headers["X-Request-Id"] = request.state.request_id
        return response

    async def answer(request: Any, adapt: bool) -> Any:
        if not engine.ready:
            raise _not_ready(engine)
        body = await read_body(request, settings.max_body_bytes, settings.timeout_s)
        data, body_opts, where = await image_and_options(request, body)
        opts = _options(request.query_params, body_opts, adapt)
        engine.model(opts.get("model"))  # an unknown model is refused before any work is queued
        sid = request.headers.get("x-session-id")
        if sid is not None:
            check_session_id(sid)
        try:
            result = await engine.submit(data, where, opts, adapt, sid)
        except TTARuntimeError as e:
            raise runtime_error_status(e) from None
        metrics.answered(result, "adapt" if adapt else "predict")
        headers = {"X-Replica-Id": result["replica"]} if result.get("replica") else None
        return JSONResponse({"request_id": request.state.request_id, **result}, headers=headers)

    extra = _openapi_extra()
    responses = {s: {"model": schemas.ErrorResponse} for s in (400, 413, 415, 422, 429, 503, 504)}

    @app.post("/v1/predict", response_model=schemas.PredictResponse, responses=responses, openapi_extra=extra)
    async def predict(request: fastapi.Request) -> Any:
        """Segment or classify one image without adapting (with X-Session-Id: with the session's adapted weights)."""
        return await answer(request, adapt=False)

    @app.post("/v1/adapt", response_model=schemas.PredictResponse, responses=responses, openapi_extra=extra)
    async def adapt(request: fastapi.Request) -> Any:
        """Adapt to one image, then predict. Episodic (the loaded weights stay untouched) unless an X-Session-Id
        header names a continual session, whose adapted state carries over to its next frame."""
        return await answer(request, adapt=True)

    @app.get("/v1/models", response_model=schemas.ModelsResponse)
    async def models() -> Any:
        if not engine.ready:
            raise _not_ready(engine)
        return await engine.describe()

    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str) -> Any:
        """Drop a continual session (its next frame starts from the loaded weights)."""
        check_session_id(session_id)
        if not await engine.drop_session(session_id):
            raise ServeError(404, "unknown_session", f"no session {session_id!r} is held here")
        return {"dropped": session_id}

    @app.get("/healthz")
    async def healthz() -> Any:
        """The process answers (liveness); see /readyz for the models."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Ready, responses={503: {"model": schemas.Ready}})
    async def readyz() -> Any:
        """200 once every model is loaded and warmed up; 503 (with the reason) before, or if loading failed."""
        body = {"ready": engine.ready, "models": list(engine.models) if engine.ready else [],
                "reason": None if engine.ready else engine.failed or "loading"}
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Any:
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/samples")
    async def samples() -> Any:
        """Bundled sample images, for trying the API (and the page)."""
        return {"samples": [{"name": "ood_sample.png", "url": "/v1/samples/ood_sample.png",
                             "description": "96x96 scene of flat shapes on a textured background (a background texture the shipped segmenter was not trained on)"}]}

    @app.get("/v1/samples/{name}")
    async def sample(name: str) -> Any:
        from tta_runtime.hub import sample_image_path

        path = sample_image_path()
        if name != path.name:
            raise ServeError(404, "unknown_sample", f"no sample {name!r}; GET /v1/samples lists them")
        return FileResponse(path, media_type="image/png")

    @app.get("/", include_in_schema=False)
    async def page() -> Any:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _request_id(request: Any) -> str:
    return getattr(request.state, "request_id", None) or uuid.uuid4().hex


def _not_ready(engine: Engine) -> ServeError:
    if engine.failed:
        return ServeError(503, "not_ready", f"the models failed to load: {engine.failed}")
    return ServeError(503, "not_ready", "the models are still loading; retry shortly (GET /readyz says when)",
                      headers={"Retry-After": str(RETRY_AFTER_S)})


def _options(query: Any, body_opts: dict[str, Any], adapt: bool) -> dict[str, Any]:
    """The request's options from the query string and the JSON body, validated (`schemas.RequestOptions`)."""
    opts: dict[str, Any] = {}
    for key in query.keys():
        values = query.getlist(key)
        if len(values) > 1:
            raise ServeError(422, "invalid_option", f"query parameter {key!r} is given {len(values)} times; give it once", field=key)
        opts[key] = values[0]
    for key, value in body_opts.items():
        if key in opts:
            raise ServeError(422, "invalid_option", f"{key!r} is given both in the query and in the JSON body; give it once", field=key)
        opts[key] = value
    try:
        parsed = schemas.RequestOptions.model_validate(opts).model_dump(exclude_unset=True)
    except ValidationError as e:
        raise _invalid(e.errors()) from None
    if not adapt and (given := [k for k in _ADAPT_ONLY if k in parsed]):
        raise ServeError(422, "invalid_option", f"{given} apply to adaptation; /v1/predict does not adapt: use /v1/adapt",
                         field=given[0])
    return parsed


def _invalid(errors: list[dict[str, Any]]) -> ServeError:
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body")) or "request"
    got = first.get("input")
    text = f"{where}: {first.get('msg', 'invalid')}"
    if first.get("type") == "extra_forbidden":
        text = f"unknown option {where!r}; options: {sorted(schemas.RequestOptions.model_fields)} (and 'image' in a JSON body)"
    elif not isinstance(got, (dict, list)):
        text += f" (got {str(got)[:80]!r})"
    return ServeError(422, "invalid_option", text, field=where)


def _openapi_extra() -> dict[str, Any]:
    """The query parameters and request bodies of /v1/predict and /v1/adapt for the OpenAPI schema (the
    route reads the body itself, to check limits while reading)."""
    params = []
    for name, f in schemas.RequestOptions.model_fields.items():
        schema = schemas.RequestOptions.model_json_schema()["properties"][name]
        params.append({"name": name, "in": "query", "required": False, "schema": schema, "description": f.description or ""})
    params.append({"name": "X-Session-Id", "in": "header", "required": False, "schema": {"type": "string"},
                   "description": "a continual session: adapted state kept per id (LRU + TTL bounded)"})
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"parameters": params, "requestBody": {"required": True, "description": f"one image: {ACCEPTED}", "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}},
                                           "required": ["image"]}},
        "image/png": binary, "image/jpeg": binary, "image/webp": binary, "image/bmp": binary,
        "application/octet-stream": binary,
        "application/json": {"schema": schemas.ImageJSON.model_json_schema()},
    }}}
