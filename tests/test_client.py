"""EngineClient against a real engine service and against scripted servers (retries, errors, timeouts)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from engine.api import PoemRequest
from engine.errors import EngineUnavailableError, QueueFullError, RequestError
from engine.serving.client import EngineClient
from engine.serving.local import LocalEngine
from engine.serving.service import ServiceSettings, create_app
from engine_fixtures import checkpoint_store, engine_settings  # noqa: F401

TOKEN = "client-test-token"


@pytest.fixture
async def service_url(aiohttp_server, checkpoint_store):
    server = await aiohttp_server(create_app(ServiceSettings(engine=engine_settings(checkpoint_store), token=TOKEN)))
    return str(server.make_url("/"))


async def test_the_client_writes_the_same_poem_as_the_in_process_engine(service_url, checkpoint_store):
    request = PoemRequest(prompt="风", form="wulv", mode="sample", seed=11)
    async with EngineClient(service_url) as client:
        remote = await client.generate(request)
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        local = await engine.generate(request)
    assert (remote.poem, remote.lines, remote.model, remote.score) == (local.poem, local.lines, local.model, local.score)


async def test_a_400_comes_back_as_the_same_request_error(service_url):
    async with EngineClient(service_url) as client:
        with pytest.raises(RequestError) as info:
            await client.generate(PoemRequest(prompt="龘"))
    assert (info.value.code, info.value.field) == ("unknown_character", "prompt")


async def test_models_status_and_reload_go_through(service_url):
    async with EngineClient(service_url, token=TOKEN) as client:
        models = await client.models()
        status = await client.status()
        report = await client.reload("lstm")
        assert await client.ready()
    assert [m["name"] for m in models] == ["lstm", "gru"]
    assert status["models"]["lstm"] == models[0]["version"]
    assert report["lstm"]["status"] == "unchanged"


async def test_reload_of_an_empty_name_is_refused_as_in_process_not_taken_for_every_model(service_url):
    async with EngineClient(service_url, token=TOKEN) as client:
        with pytest.raises(RequestError):
            await client.reload("")


async def test_reload_without_the_token_is_refused(service_url):
    async with EngineClient(service_url) as client:
        with pytest.raises(PermissionError):
            await client.reload()
    async with EngineClient(service_url, token="wrong") as client:
        with pytest.raises(PermissionError):
            await client.reload()


def scripted_app(answers: list[tuple[int, dict, dict]]) -> tuple[web.Application, list]:
    """An app whose POST /v1/poems gives the scripted (status, body, headers) answers in turn, then repeats the last."""
    calls = []

    async def poems(request):
        calls.append(await request.json())
        status, body, headers = answers[min(len(calls), len(answers)) - 1]
        return web.json_response(body, status=status, headers=headers)

    app = web.Application()
    app.router.add_post("/v1/poems", poems)
    return app, calls


POEM = {"poem": "甲，乙。", "lines": ["甲", "乙"], "form": "qijue", "mode": "greedy",
        "model": {"name": "lstm", "version": "v"}, "elapsed_ms": 1.0}
BUSY = (503, {"error": {"code": "queue_full", "field": None, "message": "busy"}}, {"Retry-After": "0"})


async def test_a_503_is_retried_with_backoff_until_it_succeeds(aiohttp_server):
    app, calls = scripted_app([BUSY, BUSY, (200, POEM, {})])
    server = await aiohttp_server(app)
    async with EngineClient(str(server.make_url("/")), retries=3, backoff=0.01) as client:
        result = await client.generate(PoemRequest(mode="greedy"))
    assert result.poem == POEM["poem"] and len(calls) == 3


async def test_a_proxys_502_is_retried_and_then_reported_as_unavailable(aiohttp_server):
    bad_gateway = (502, {}, {})
    app, calls = scripted_app([bad_gateway, (200, POEM, {})])
    server = await aiohttp_server(app)
    async with EngineClient(str(server.make_url("/")), retries=2, backoff=0.01) as client:
        assert (await client.generate(PoemRequest(mode="greedy"))).poem == POEM["poem"]
    assert len(calls) == 2
    app, calls = scripted_app([bad_gateway])
    server = await aiohttp_server(app)
    async with EngineClient(str(server.make_url("/")), retries=2, backoff=0.01) as client:
        with pytest.raises(EngineUnavailableError, match="502"):
            await client.generate(PoemRequest())
    assert len(calls) == 3


async def test_a_queue_that_stays_full_raises_queue_full_after_the_retries(aiohttp_server):
    app, calls = scripted_app([BUSY])
    server = await aiohttp_server(app)
    async with EngineClient(str(server.make_url("/")), retries=2, backoff=0.01) as client:
        with pytest.raises(QueueFullError):
            await client.generate(PoemRequest())
    assert len(calls) == 3


async def test_an_unavailable_engine_raises_engine_unavailable(aiohttp_server):
    app, _ = scripted_app([(503, {"error": {"code": "unavailable", "message": "no model"}}, {"Retry-After": "0"})])
    server = await aiohttp_server(app)
    async with EngineClient(str(server.make_url("/")), retries=1, backoff=0.01) as client:
        with pytest.raises(EngineUnavailableError, match="no model"):
            await client.generate(PoemRequest())


async def test_an_unreachable_engine_raises_engine_unavailable_after_retrying():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with EngineClient(f"http://127.0.0.1:{port}", retries=2, backoff=0.01) as client:
        with pytest.raises(EngineUnavailableError, match="cannot reach"):
            await client.generate(PoemRequest())


async def test_a_slow_engine_raises_timeout_error(aiohttp_server):
    async def slow(request):
        await asyncio.sleep(2)
        return web.json_response(POEM)

    app = web.Application()
    app.router.add_post("/v1/poems", slow)
    server = await aiohttp_server(app)
    async with EngineClient(str(server.make_url("/")), timeout=0.2) as client:
        with pytest.raises(TimeoutError):
            await client.generate(PoemRequest())


async def test_a_bad_request_is_refused_before_anything_is_sent():
    async with EngineClient("http://127.0.0.1:9") as client:
        with pytest.raises(RequestError) as info:
            await client.generate(PoemRequest(beam_width=99))
    assert info.value.field == "beam_width"


async def test_a_retry_after_longer_than_the_backoff_is_waited_out(aiohttp_server):
    """The client capped every wait at max_backoff (5 s): asked to come back in 30 s, it came back at 5, 10, 15 s."""
    arrivals = []
    app, calls = scripted_app([(503, BUSY[1], {"Retry-After": "1"}), (200, POEM, {})])
    app.middlewares.append(web.middleware(lambda request, handler: (arrivals.append(asyncio.get_running_loop().time()),
                                                                    handler(request))[1]))
    server = await aiohttp_server(app)
    async with EngineClient(str(server.make_url("/")), retries=3, backoff=0.01, max_backoff=0.01) as client:
        assert (await client.generate(PoemRequest(mode="greedy"))).poem == POEM["poem"]
    assert len(calls) == 2 and arrivals[1] - arrivals[0] >= 1.0 - 1e-3


async def test_a_retry_after_beyond_what_the_call_may_wait_raises_at_once(aiohttp_server):
    app, calls = scripted_app([(503, BUSY[1], {"Retry-After": "3600"})])
    server = await aiohttp_server(app)
    async with EngineClient(str(server.make_url("/")), retries=3) as client:
        with pytest.raises(QueueFullError) as info:
            await client.generate(PoemRequest())
    assert info.value.retry_after == 3600 and len(calls) == 1


async def test_a_retry_after_beyond_the_requests_own_timeout_raises_at_once(aiohttp_server):
    """A request with timeout=2 was told "busy" only after 27 s of Retry-After waits."""
    app, calls = scripted_app([(503, BUSY[1], {"Retry-After": "5"})])
    server = await aiohttp_server(app)
    async with EngineClient(str(server.make_url("/")), retries=3) as client:
        with pytest.raises(QueueFullError):
            await client.generate(PoemRequest(timeout=2.0))
    assert len(calls) == 1


def http_reply(status: str, body: bytes, length: int | None = None) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: "
            f"{len(body) if length is None else length}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def raw_server(replies: list[bytes]) -> tuple[str, list, asyncio.AbstractServer]:
    """A loopback TCP server that reads each request in full, writes the next of `replies` as it is (the last
    repeats) and closes the connection."""
    calls = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        calls.append(head)
        writer.write(replies[min(len(calls), len(replies)) - 1])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", calls, server


CUT_SHORT = http_reply("200 OK", b'{"poem": "', length=400)  # the engine killed while it wrote its reply


@pytest.mark.parametrize("cut", [CUT_SHORT, http_reply("503 Service Unavailable", b'{"error": ', length=400)])
async def test_a_reply_that_breaks_off_mid_body_is_retried_then_unavailable(cut):
    """aiohttp's ClientPayloadError escaped the client unretried, outside its documented errors."""
    import json

    url, calls, server = await raw_server([cut, http_reply("200 OK", json.dumps(POEM).encode())])
    async with server, EngineClient(url, retries=2, backoff=0.01) as client:
        assert (await client.generate(PoemRequest(mode="greedy"))).poem == POEM["poem"]
    assert len(calls) == 2
    url, calls, server = await raw_server([cut])
    async with server, EngineClient(url, retries=2, backoff=0.01) as client:
        with pytest.raises(EngineUnavailableError):
            await client.generate(PoemRequest(mode="greedy"))
    assert len(calls) == 3


async def test_a_reply_that_is_not_http_is_unavailable_at_once():
    url, calls, server = await raw_server([b"SSH-2.0-OpenSSH_9.2\r\n"])  # ENGINE_URL naming the wrong port
    async with server, EngineClient(url, retries=2, backoff=0.01) as client:
        with pytest.raises(EngineUnavailableError, match="not an HTTP reply"):
            await client.generate(PoemRequest(mode="greedy"))
    assert len(calls) == 1
