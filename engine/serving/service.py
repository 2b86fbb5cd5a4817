"""The engine over HTTP: an aiohttp app serving the contract of engine/api.py (routes in docs/ENGINE.md).

    python -m engine serve [--host 127.0.0.1 --port 8080 --checkpoints DIR --device auto]

    POST /v1/poems           {"prompt": "月", "form": "qijue", "mode": "beam"} → {"poem": …}
    POST /v1/check           {"poem": "白日依山尽，…"} → its meter: form, style, tones, rhyme, faults
    GET  /v1/models          the serving models and versions
    GET  /v1/tunes           the 词 tunes the engine writes
    GET  /v1/status          queue depth, running rows, versions, uptime, counts
    GET  /healthz            the process is alive
    GET  /readyz             200 when a model is loaded and the step loop runs, else 503
    GET  /metrics            Prometheus text
    POST /v1/admin/reload    {"model": "lstm"} optional; `Authorization: Bearer $ENGINE_TOKEN`

Every error is JSON `{"error": {"code", "field", "message"}}`: 400 for bad input (never a 500), 413 for
a body over the limit, 503 with Retry-After when the queue is full, 504 when a request's deadline passes.
The engine lives in a cleanup_ctx: it starts with the app and, on shutdown, drains in-flight requests.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

from aiohttp import web

from engine.api import PoemRequest
from engine.errors import EngineUnavailableError, QueueFullError, RequestError
from engine.poem.meter import check_body
from engine.poem.tunes import TUNES, tune_entry
from engine.serving.local import EngineSettings, LocalEngine
from engine.serving.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

MIN_TOKEN_LEN = 32  # an admin token short enough to guess is refused at start-up
MAX_BODY_BYTES = 16 * 1024  # a request is a few hundred bytes; anything bigger is a mistake or abuse


@dataclass
class ServiceSettings:
    engine: EngineSettings = field(default_factory=EngineSettings)  # what the in-process engine loads and how
    host: str = "127.0.0.1"  # loopback by default: put a proxy in front to expose it
    port: int = 8080
    # ENGINE_TOKEN: bearer token for /v1/admin/*; None disables them. repr=False keeps it out of logs.
    token: str | None = field(default=None, repr=False)
    max_body_bytes: int = MAX_BODY_BYTES
    drain_timeout: float = 30.0  # seconds shutdown waits for in-flight requests

    @classmethod
    def from_env(cls, env=None, **engine_overrides) -> ServiceSettings:
        env = os.environ if env is None else env
        token = (env.get("ENGINE_TOKEN") or "").strip() or None
        if token is not None and len(token) < MIN_TOKEN_LEN:
            # Never echo it: a short token is still a secret.
            raise ValueError(f"ENGINE_TOKEN is too short ({len(token)} characters): use at least {MIN_TOKEN_LEN}, e.g. "
                             "python -c 'import secrets; print(secrets.token_urlsafe(32))'; or unset it to "
                             "disable the admin API")
        return cls(engine=EngineSettings.from_env(env, **engine_overrides), token=token)


ENGINE = web.AppKey("engine", LocalEngine)
SETTINGS = web.AppKey("settings", ServiceSettings)


# -- errors ------------------------------------------------------------------------------------------------
class UnreadableBody(RequestError):
    """A body that does not decode: a 400 after which the connection closes, since where the rest of the body
    ends and the next request starts cannot be told."""


def dumps(obj) -> str:
    """JSON with Chinese readable; \\u escapes only when the text would not encode (an echoed lone surrogate)."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj)
    return text


def error_response(status: int, code: str, message: str, field: str | None = None, headers=None) -> web.Response:
    body = {"error": {"code": code, "field": field, "message": message}}
    return web.json_response(body, status=status, headers=headers, dumps=dumps)


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure leaves as a JSON error; input problems are 4xx, only our own bugs are 500."""
    try:
        return await handler(request)
    except RequestError as e:
        response = error_response(400, e.code, e.message, e.field)
        if isinstance(e, UnreadableBody):
            response.force_close()
        return response
    except QueueFullError as e:
        retry = str(max(1, math.ceil(e.retry_after)))
        return error_response(503, "queue_full", str(e), headers={"Retry-After": retry})
    except EngineUnavailableError as e:
        return error_response(503, "unavailable", str(e), headers={"Retry-After": "5"})
    except TimeoutError as e:
        return error_response(504, "timeout", str(e) or "the request's deadline passed")
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS].max_body_bytes
        return error_response(413, "body_too_large", f"the body is over the {limit}-byte limit")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status, "http_error")
        return error_response(e.status, code, e.reason if e.text is None or not e.text.strip() else e.text.strip(),
                              headers={k: v for k, v in e.headers.items() if k == "Allow"})
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error")


async def read_json(request: web.Request, allow_empty: bool = True):
    """The body as JSON; 400 naming the problem for a body that does not decode, bad UTF-8 or bad JSON, 413 over
    the size limit."""
    try:
        raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    except web.RequestPayloadError:  # a compressed body that does not decompress, or one cut short
        # NOTE: marked as read to its end: else aiohttp, finishing the request, reads it again and logs the
        # same error as unhandled, with a traceback.
        request.content.feed_eof()
        raise UnreadableBody("bad_encoding", None, "the body does not decode as its Content-Encoding says, "
                                                   "or it ended early") from None
    if not raw.strip():
        if allow_empty:
            return {}
        raise RequestError("bad_request", None, "the body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError("bad_encoding", None, f"the body is not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError("bad_json", None, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except ValueError:  # an integer literal past Python's 4300-digit limit
        raise RequestError("bad_json", None, "the JSON holds a number too long to read") from None
    except RecursionError:
        raise RequestError("bad_json", None, "the JSON is nested too deeply") from None


# -- handlers ------------------------------------------------------------------------------------------------
async def create_poem(request: web.Request) -> web.Response:
    """POST /v1/poems: validate, queue, wait for the poem. A client that goes away frees its rows: the
    server runs with handler_cancellation, so its handler is cancelled, and so is the engine's wait."""
    poem_request = PoemRequest.from_dict(await read_json(request))
    result = await request.app[ENGINE].generate(poem_request)
    return web.json_response(result.to_dict(), dumps=dumps)


async def check_meter(request: web.Request) -> web.Response:
    """POST /v1/check: the meter of a pasted poem (engine.poem.meter); needs no model, so never queues."""
    report = check_body(await read_json(request, allow_empty=False))
    return web.json_response(report.to_dict(), dumps=dumps)


async def list_tunes(request: web.Request) -> web.Response:
    """GET /v1/tunes: every 词 tune a request may name, with its structure (engine.poem.tunes)."""
    return web.json_response({"tunes": [tune_entry(t) for t in TUNES.values()]}, dumps=dumps)


async def list_models(request: web.Request) -> web.Response:
    models = await request.app[ENGINE].models()
    return web.json_response({"models": models}, dumps=dumps)


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[ENGINE].status())


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    if engine.ready:
        return web.json_response({"status": "ready", "models": engine.loaded_names()})
    return error_response(503, "not_ready", "no model is loaded or the engine is not running",
                          headers={"Retry-After": "5"})


async def metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    engine.refresh_gauges()
    return web.Response(body=engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def admin_reload(request: web.Request) -> web.Response:
    """POST /v1/admin/reload: load, validate and swap the newest published versions now."""
    token = request.app[SETTINGS].token
    if not token:
        return error_response(403, "admin_disabled", "the admin API is disabled: ENGINE_TOKEN is not set")
    auth = request.headers.get("Authorization", "")
    scheme, _, given = auth.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return error_response(401, "unauthorized", "send Authorization: Bearer <ENGINE_TOKEN>",
                              headers={"WWW-Authenticate": 'Bearer realm="yinshi-engine"'})
    try:
        # aiohttp keeps undecodable header bytes as surrogates; such a header is no token of ours.
        given_bytes = given.strip().encode("utf-8")
    except UnicodeEncodeError:
        return error_response(401, "unauthorized", "send Authorization: Bearer <ENGINE_TOKEN>",
                              headers={"WWW-Authenticate": 'Bearer realm="yinshi-engine"'})
    if not hmac.compare_digest(given_bytes, token.encode()):
        return error_response(403, "forbidden", "wrong token")
    body = await read_json(request)
    if not isinstance(body, dict):
        raise RequestError("bad_request", None, "the body must be a JSON object")
    unknown = sorted(set(body) - {"model"})
    if unknown:
        raise RequestError("unknown_field", unknown[0], f"unknown field {unknown[0]!r}; allowed: model")
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise RequestError("bad_type", "model", f"model must be str, got {type(name).__name__}")
    return web.json_response({"models": await request.app[ENGINE].reload(name)})


# -- app -------------------------------------------------------------------------------------------------------
def create_app(settings: ServiceSettings | None = None, engine: LocalEngine | None = None) -> web.Application:
    """The aiohttp app; the engine (made from settings.engine unless given) starts and stops with it."""
    settings = settings or ServiceSettings()
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[ENGINE] = engine or LocalEngine(settings.engine)

    async def engine_ctx(app: web.Application):
        await app[ENGINE].start()
        yield
        await app[ENGINE].close(drain_timeout=settings.drain_timeout)

    app.cleanup_ctx.append(engine_ctx)
    app.router.add_post("/v1/poems", create_poem)
    app.router.add_post("/v1/check", check_meter)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/tunes", list_tunes)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/admin/reload", admin_reload)
    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--checkpoints", default=None, help="checkpoint store (default $CHECKPOINT_DIR)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default $DEVICE or auto")
    parser.add_argument("--max-rows", type=int, default=None, help="batch rows per step (default 256)")
    parser.add_argument("--max-queue", type=int, default=None, help="waiting requests before 503 (default 1024)")


def main(args) -> int:
    level = os.environ.get("LOG_LEVEL", "INFO").strip().upper()
    level = level if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ServiceSettings.from_env(checkpoint_dir=args.checkpoints, device=args.device,
                                            max_num_rows=args.max_rows, max_queue=args.max_queue)
    except ValueError as e:
        print(f"python -m engine serve: {e}", file=sys.stderr)
        return 2
    settings.host, settings.port = args.host, args.port
    # handler_cancellation: a client that hangs up cancels its handler (create_poem), which frees its rows.
    web.run_app(create_app(settings), host=settings.host, port=settings.port,
                shutdown_timeout=settings.drain_timeout, access_log=None, handler_cancellation=True)
    return 0
