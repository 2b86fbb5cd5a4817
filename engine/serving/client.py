"""The engine over HTTP, with the same interface as the in-process `engine.serving.local.LocalEngine`.

    async with EngineClient("http://127.0.0.1:8080", token=os.environ.get("ENGINE_TOKEN")) as engine:
        result = await engine.generate(PoemRequest(prompt="月", form="qijue"))

Errors map back to the in-process ones: a 400 becomes RequestError (same code, field and message); a 503
is retried with backoff and, once the retries run out, becomes QueueFullError (queue full) or
EngineUnavailableError (no model, or the service cannot be reached); a 504 is TimeoutError. Connection
errors, a reply that breaks off mid-body and a proxy's 502 (no replica answered: one may be restarting)
are retried too: a poem request is safe to repeat. A reply that is not HTTP at all (ENGINE_URL naming
another service) is EngineUnavailableError at once. Between attempts the client waits as long as the
server's Retry-After says (at least its own backoff), and at most `max_wait` seconds in all for one call:
when the server asks for longer than is left, the call raises the server's error at once (QueueFullError
keeps its retry_after), so the caller can say "busy" instead of hanging.
"""

from __future__ import annotations

import asyncio
import json
import math
import random

import aiohttp

from engine.api import PoemRequest, PoemResult
from engine.errors import EngineUnavailableError, QueueFullError, RequestError


class EngineClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.2, max_backoff: float = 5.0, max_wait: float = 30.0,
                 session: aiohttp.ClientSession | None = None):
        self.base_url = base_url.rstrip("/")
        self.token = token
        # sock_connect, not connect: aiohttp's `connect` also counts the wait for a pooled connection, so past
        # 100 callers at once (the pool's limit) requests failed as 'connection timeout' instead of queueing.
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 5.0))
        self.retries = retries  # extra attempts after the first, on 502, 503 and connection errors
        self.backoff, self.max_backoff = backoff, max_backoff  # first delay, doubling, capped
        self.max_wait = max_wait  # seconds one call may wait between its attempts, Retry-After included, in all
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> EngineClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
            self._own_session = True
        return self._session

    # -- the PoemEngine interface ----------------------------------------------------------------------
    async def generate(self, request: PoemRequest) -> PoemResult:
        request.validate()  # fail fast, the same way LocalEngine does
        timeout = None
        if request.timeout is not None:  # wait a little longer than the server will
            timeout = aiohttp.ClientTimeout(total=request.timeout + 5.0, sock_connect=self.timeout.sock_connect)
        data = await self._call("POST", "/v1/poems", json_body=request.to_dict(), timeout=timeout,
                                budget=request.timeout)
        return PoemResult.from_dict(data)

    async def models(self) -> list[dict]:
        return (await self._call("GET", "/v1/models"))["models"]

    async def tunes(self) -> list[dict]:
        return (await self._call("GET", "/v1/tunes"))["tunes"]

    async def status(self) -> dict:
        return await self._call("GET", "/v1/status")

    async def reload(self, name: str | None = None) -> dict:
        body = {"model": name} if name is not None else {}  # "" is refused as LocalEngine refuses it, not "all"
        return (await self._call("POST", "/v1/admin/reload", json_body=body, auth=True))["models"]

    async def ready(self) -> bool:
        """True when the service answers /readyz with 200."""
        try:
            session = self._get_session()
            async with session.get(self.base_url + "/readyz") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    # -- one call, with retries --------------------------------------------------------------------------
    async def _call(self, method: str, path: str, json_body=None, auth: bool = False, timeout=None,
                    budget: float | None = None) -> dict:
        """One call with its retries, all within `max_wait` seconds (and `budget`, the caller's own timeout)
        from its start: a retry that could only begin after that is not made, and the last error is raised."""
        headers = {}
        if auth:
            if not self.token:
                raise PermissionError("this call needs the engine's admin token (ENGINE_TOKEN)")
            headers["Authorization"] = f"Bearer {self.token}"
        body = None if json_body is None else json.dumps(json_body, ensure_ascii=False).encode()
        if body is not None:
            headers["Content-Type"] = "application/json"
        last: Exception | None = None
        loop = asyncio.get_running_loop()
        give_up = loop.time() + min(self.max_wait, budget if budget is not None else math.inf)
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                session = self._get_session()
                async with session.request(method, self.base_url + path, data=body, headers=headers,
                                           timeout=timeout or self.timeout) as resp:
                    payload = await _json_or_none(resp)
                    if resp.status < 400:
                        return payload if payload is not None else {}
                    error = (payload or {}).get("error") if isinstance(payload, dict) else None
                    error = error if isinstance(error, dict) else {}
                    code, message = error.get("code", "http_error"), error.get("message", resp.reason or "")
                    if resp.status == 503:
                        retry_after = _seconds(resp.headers.get("Retry-After"))
                        last = (QueueFullError(retry_after or 1.0) if code == "queue_full"
                                else EngineUnavailableError(f"{self.base_url}: {message}"))
                    elif resp.status == 502:  # a proxy in front found no replica answering: it may be restarting
                        last = EngineUnavailableError(f"{self.base_url}{path}: HTTP 502: {message}")
                    elif resp.status == 504:
                        raise TimeoutError(message)
                    elif resp.status in (401, 403):
                        raise PermissionError(f"{self.base_url}{path}: {message}")
                    elif 400 <= resp.status < 500:
                        raise RequestError(code, error.get("field"), message)
                    else:
                        raise EngineUnavailableError(f"{self.base_url}{path}: HTTP {resp.status}: {message}")
            except aiohttp.ClientConnectionError as e:  # refused, reset, disconnected: the service may be restarting
                last = EngineUnavailableError(f"cannot reach the engine at {self.base_url}: {e}")
            except aiohttp.ClientPayloadError as e:  # the reply broke off mid-body: an engine killed, a proxy's reset
                last = EngineUnavailableError(f"{self.base_url}{path}: the reply broke off: {e}")
            except aiohttp.ClientError as e:  # not an HTTP reply: another service on that port; a retry gets the same
                raise EngineUnavailableError(f"{self.base_url}{path}: not an HTTP reply ({type(e).__name__})") from None
            except asyncio.TimeoutError as e:
                raise TimeoutError(f"{method} {self.base_url}{path} timed out") from e
            if attempt == self.retries:
                break
            delay = max(self._backoff(attempt), retry_after or 0.0)
            if loop.time() + delay > give_up:  # asked to come back later than this call may wait
                break
            await asyncio.sleep(delay)
        assert last is not None
        raise last

    def _backoff(self, attempt: int) -> float:
        """The client's own wait before retry `attempt` + 1: doubling from `backoff`, capped, jittered."""
        return min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)


async def _json_or_none(resp: aiohttp.ClientResponse):
    try:
        return await resp.json(content_type=None)
    except (json.JSONDecodeError, aiohttp.ContentTypeError, UnicodeDecodeError, ValueError):
        return None


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
