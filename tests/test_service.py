"""The HTTP service on a real socket: the contract's routes, every bad input a 4xx JSON error, 503 when full."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from engine.poem.forms import FORMS, classify
from engine.serving.service import ENGINE, ServiceSettings, add_arguments, create_app
from engine_fixtures import checkpoint_store, engine_settings  # noqa: F401

TOKEN = "s3cret-token"


@pytest.fixture
async def client(aiohttp_client, checkpoint_store):
    settings = ServiceSettings(engine=engine_settings(checkpoint_store), token=TOKEN)
    return await aiohttp_client(create_app(settings))


async def error_of(resp, status: int) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert error["message"] and error["code"]
    return error


async def test_a_poem_request_returns_the_contract_fields(client):
    resp = await client.post("/v1/poems", json={"prompt": "月", "form": "qijue", "mode": "beam", "beam_width": 5,
                                                "temperature": 0.6, "top_p": 0.9, "acrostic": None, "rhyme": True,
                                                "tone": True, "model": "lstm", "seed": 7})
    assert resp.status == 200
    body = await resp.json()
    assert {"poem", "lines", "form", "mode", "model", "elapsed_ms"} <= set(body)
    assert body["poem"].startswith("月") and classify(body["lines"]) is FORMS["qijue"]
    assert body["model"]["name"] == "lstm" and body["model"]["version"]
    assert body["mode"] == "beam" and body["elapsed_ms"] > 0


async def test_rhymes_end_the_rhyming_lines_of_the_poem_returned(client):
    resp = await client.post("/v1/poems", json={"form": "wujue", "rhymes": "明城声", "mode": "beam", "seed": 3})
    assert resp.status == 200, await resp.text()
    lines = (await resp.json())["lines"]
    assert lines[0][-1] + lines[1][-1] + lines[3][-1] == "明城声"


async def test_an_empty_body_means_every_field_takes_its_default(client):
    resp = await client.post("/v1/poems", data=b"")
    assert resp.status == 200
    assert (await resp.json())["form"] == "qijue"


@pytest.mark.parametrize("body, code, field", [
    (b"{", "bad_json", None),
    (b"\xff\xfe{}", "bad_encoding", None),
    (b"[1, 2]", "bad_request", None),
    (b'"just a string"', "bad_request", None),
    (b"[" * 5000 + b"]" * 5000, "bad_request", None),
    (b'{"prompt": "\\ud800"}', "bad_character", "prompt"),
])
async def test_a_body_that_is_not_a_json_object_is_a_400_with_a_message(client, body, code, field):
    resp = await client.post("/v1/poems", data=body, headers={"Content-Type": "application/json"})
    error = await error_of(resp, 400)
    assert error["field"] == field
    assert error["code"] == code or (code == "bad_request" and error["code"] == "bad_json")


@pytest.mark.parametrize("payload, field", [
    ({"poem": "x"}, "poem"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["月"]}, "prompt"),
    ({"prompt": "moon"}, "prompt"),
    ({"prompt": "月" * 15}, "prompt"),
    ({"prompt": "龘"}, "prompt"),
    ({"form": "sonnet"}, "form"),
    ({"form": 4}, "form"),
    ({"mode": "fast"}, "mode"),
    ({"beam_width": "5"}, "beam_width"),
    ({"beam_width": True}, "beam_width"),
    ({"beam_width": 17}, "beam_width"),
    ({"beam_width": 2.5}, "beam_width"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 1e400}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"acrostic": "春夏秋"}, "acrostic"),
    ({"acrostic": "春夏秋冬", "prompt": "月"}, "acrostic"),
    ({"acrostic": "ABCD"}, "acrostic"),
    ({"rhyme": "yes"}, "rhyme"),
    ({"rhymes": "城"}, "rhymes"),
    ({"rhymes": "城城"}, "rhymes"),
    ({"rhymes": "城月"}, "rhymes"),
    ({"rhymes": 5}, "rhymes"),
    ({"tone": 1}, "tone"),
    ({"model": 3}, "model"),
    ({"model": "transformer"}, "model"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"timeout": -1}, "timeout"),
])
async def test_every_bad_field_is_a_400_naming_the_field(client, payload, field):
    resp = await client.post("/v1/poems", json=payload)
    error = await error_of(resp, 400)
    assert error["field"] == field


async def test_a_non_finite_number_is_a_400_not_a_500(client):
    resp = await client.post("/v1/poems", data=b'{"temperature": NaN}')
    assert (await error_of(resp, 400))["field"] == "temperature"


@pytest.mark.parametrize("path", ["/v1/poems", "/v1/check", "/v1/admin/reload"])
async def test_a_body_whose_content_encoding_does_not_decode_is_a_400_not_a_500(client, caplog, path):
    """aiohttp raised from request.read() for a corrupt gzip body, and the middleware answered 500 with a
    traceback in the log, for any client to repeat."""
    gzip_start = b"\x1f\x8b\x08\x00" + b"\x00" * 6  # a gzip header, then no valid deflate stream
    resp = await client.post(path, data=gzip_start + b"not deflate at all", headers={
        "Content-Type": "application/json", "Content-Encoding": "gzip", "Authorization": f"Bearer {TOKEN}"})
    assert (await error_of(resp, 400))["code"] == "bad_encoding"
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_body_over_the_limit_is_a_413(client):
    resp = await client.post("/v1/poems", data=b'{"prompt": "' + b"a" * 20_000 + b'"}')
    assert (await error_of(resp, 413))["code"] == "body_too_large"


async def test_unknown_routes_and_methods_are_json_errors(client):
    assert (await error_of(await client.get("/v1/nothing"), 404))["code"] == "not_found"
    assert (await error_of(await client.get("/v1/poems"), 405))["code"] == "method_not_allowed"


async def test_health_readiness_models_status_and_metrics_answer(client):
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["models"] == ["lstm", "gru"]
    models = (await (await client.get("/v1/models")).json())["models"]
    assert [m["name"] for m in models] == ["lstm", "gru"]
    assert {"cell", "version", "parameters", "vocab_size", "trained_on"} <= set(models[0])
    await client.post("/v1/poems", json={"mode": "greedy"})
    status = await (await client.get("/v1/status")).json()
    assert status["requests"]["completed"] == 1 and status["models"]["lstm"] == models[0]["version"]
    text = await (await client.get("/metrics")).text()
    for name in ("yinshi_queue_depth", "yinshi_running_rows", "yinshi_batch_rows_bucket", "yinshi_step_seconds_bucket",
                 "yinshi_request_seconds_bucket", "yinshi_tokens_total", "yinshi_tokens_per_second",
                 "yinshi_model_swaps_total", "yinshi_rejections_total", "yinshi_failed_validations_total"):
        assert name in text, name
    assert 'yinshi_requests_total{outcome="completed"} 1.0' in text


async def test_a_full_queue_answers_503_fast_with_retry_after(aiohttp_client, checkpoint_store):
    settings = ServiceSettings(engine=engine_settings(checkpoint_store, max_num_rows=16, max_queue=1))
    client = await aiohttp_client(create_app(settings))
    big = {"form": "qilv", "mode": "beam", "beam_width": 16}

    finished: list[int] = []  # statuses in the order the answers arrived

    async def post():
        resp = await client.post("/v1/poems", json=big)
        body = await resp.json()
        finished.append(resp.status)
        return resp, body

    answers = await asyncio.gather(*(post() for _ in range(12)))  # 1 waits (2 if one already runs), the rest are refused
    ok = [a for a in answers if a[0].status == 200]
    full = [a for a in answers if a[0].status == 503]
    assert len(ok) + len(full) == 12 and len(ok) >= 1 and len(full) >= 9
    for resp, body in full:
        assert body["error"]["code"] == "queue_full" and int(resp.headers["Retry-After"]) >= 1
    # Refused at once, not after waiting for a row: every 503 arrived before the first poem did.
    assert finished.index(200) == len(full), finished
    text = await (await client.get("/metrics")).text()
    assert f"yinshi_rejections_total {float(len(full))}" in text


async def test_admin_reload_needs_the_bearer_token(client):
    assert (await error_of(await client.post("/v1/admin/reload"), 401))["code"] == "unauthorized"
    wrong = await client.post("/v1/admin/reload", headers={"Authorization": "Bearer nope"})
    assert (await error_of(wrong, 403))["code"] == "forbidden"
    basic = await client.post("/v1/admin/reload", headers={"Authorization": f"Basic {TOKEN}"})
    await error_of(basic, 401)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = await client.post("/v1/admin/reload", headers=auth, json={"model": 5})
    assert (await error_of(bad, 400))["field"] == "model"
    bad = await client.post("/v1/admin/reload", headers=auth, json={"name": "lstm"})
    assert (await error_of(bad, 400))["field"] == "name"
    unknown = await client.post("/v1/admin/reload", headers=auth, json={"model": "transformer"})
    assert (await error_of(unknown, 400))["field"] == "model"
    ok = await client.post("/v1/admin/reload", headers=auth)
    assert ok.status == 200
    assert {m["status"] for m in (await ok.json())["models"].values()} == {"unchanged"}


async def test_admin_reload_is_disabled_without_a_token(aiohttp_client, checkpoint_store):
    client = await aiohttp_client(create_app(ServiceSettings(engine=engine_settings(checkpoint_store))))
    resp = await client.post("/v1/admin/reload", headers={"Authorization": "Bearer anything"})
    assert (await error_of(resp, 403))["code"] == "admin_disabled"


def test_the_service_binds_loopback_by_default():
    assert ServiceSettings().host == "127.0.0.1"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).host == "127.0.0.1"


async def test_a_client_that_hangs_up_frees_its_rows(client):
    app_engine = client.app[ENGINE]
    task = asyncio.ensure_future(client.post("/v1/poems", json={"form": "qilv", "mode": "beam", "beam_width": 16,
                                                                 "prompt": "山"}))
    for _ in range(500):
        if (await app_engine.status())["running_rows"]:
            break
        await asyncio.sleep(0.002)
    task.cancel()
    for _ in range(500):
        status = await app_engine.status()
        if status["running_rows"] == 0:
            break
        await asyncio.sleep(0.01)
    assert status["running_rows"] == 0
    json.dumps(status)


async def test_the_served_process_frees_the_rows_of_a_client_that_hangs_up(checkpoint_store, tmp_path):
    # `python -m engine serve` as deployed: its handlers are cancelled when their client goes away
    # (handler_cancellation), and the cancelled wait aborts the request. Eight long beam requests hang up.
    import os
    import socket
    import sys
    from pathlib import Path

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "ENGINE_MODELS": "lstm", "ENGINE_WATCH_INTERVAL": "0",
           "DEVICE": "cpu", "ENGINE_THREADS": "1"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "engine", "serve", "--port", str(port),
                                                "--checkpoints", str(checkpoint_store), cwd=tmp_path, env=env,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async def status() -> dict:
                async with session.get(f"{url}/v1/status") as resp:
                    return await resp.json()

            for _ in range(600):
                try:
                    async with session.get(f"{url}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            body = {"form": "qilv", "mode": "beam", "beam_width": 16, "prompt": "山"}
            callers = [aiohttp.ClientSession() for _ in range(8)]
            hangs = [asyncio.ensure_future(c.post(f"{url}/v1/poems", json=body)) for c in callers]
            for _ in range(1000):
                if (await status())["running_rows"]:
                    break
                await asyncio.sleep(0.002)
            assert (await status())["running_rows"], "the requests never ran"
            for task in hangs:
                task.cancel()
            await asyncio.gather(*hangs, return_exceptions=True)
            await asyncio.gather(*(c.close() for c in callers))
            for _ in range(500):
                now = await status()
                if now["running_rows"] == 0:
                    break
                await asyncio.sleep(0.01)
            assert now["running_rows"] == 0 and now["requests"]["cancelled"] >= 1, now
    finally:
        proc.terminate()
        await proc.wait()


async def test_tunes_are_listed_and_a_ci_is_written_over_http(aiohttp_client, tmp_path, tiny_checkpoint, tiny_ci_checkpoint):
    from engine.model import versions as store
    from engine.poem.tunes import TUNES, check_ci

    root = tmp_path / "checkpoints"
    store.publish(root, "lstm", tiny_checkpoint)
    store.publish(root, "ci", tiny_ci_checkpoint)
    client = await aiohttp_client(create_app(ServiceSettings(engine=engine_settings(root, model_names=("lstm", "ci")))))
    tunes = (await (await client.get("/v1/tunes")).json())["tunes"]
    assert [t["name"] for t in tunes] == list(TUNES)
    huanxisha = tunes[0]
    assert huanxisha["name"] == "浣溪沙" and [len(s) for s in huanxisha["stanzas"]] == [3, 3]
    assert huanxisha["chars"] == 42 and huanxisha["rhyme_sets"] == ["平"]
    assert all(len(line["tones"]) == line["length"] for s in huanxisha["stanzas"] for line in s)
    resp = await client.post("/v1/poems", json={"form": "词", "tune": "浣溪紗", "prompt": "月", "mode": "beam", "seed": 3})
    body = await resp.json()
    assert resp.status == 200 and body["form"] == "ci" and body["tune"] == "浣溪沙" and body["model"]["name"] == "ci"
    assert check_ci(TUNES["浣溪沙"], body["poem"]).structure_ok and body["poem"].count("\n") == 1
    error = await error_of(await client.post("/v1/poems", json={"form": "ci", "tune": "没有这个调"}), 400)
    assert error["field"] == "tune" and error["code"] == "bad_tune"


def test_a_regular_request_sends_no_tune_so_an_engine_from_before_ci_accepts_it():
    from engine.api import PoemRequest

    assert "tune" not in PoemRequest(prompt="月").validate().to_dict()
    assert PoemRequest(form="ci", tune="浣溪沙").validate().to_dict()["tune"] == "浣溪沙"


async def test_a_timeout_shorter_than_the_request_can_ever_take_is_a_504_not_a_retryable_503(client):
    assert (await client.post("/v1/poems", json={"mode": "greedy"})).status == 200  # a step measured
    resp = await client.post("/v1/poems", json={"form": "qilv", "mode": "beam", "beam_width": 16, "timeout": 1e-6})
    error = await error_of(resp, 504)
    assert error["code"] == "timeout" and "too short" in error["message"] and "Retry-After" not in resp.headers


INTERNAL = "CUDA out of memory. Tried to allocate 2.00 GiB (/opt/yinshi/venv/lib/torch/nn/modules/rnn.py:917)"


async def failed_count(client) -> str:
    metrics = await (await client.get("/metrics")).text()
    return next((line.split()[-1] for line in metrics.splitlines()
                 if line.startswith('yinshi_requests_total{outcome="failed"}')), "none")


async def test_a_failed_step_answers_a_plain_503_logs_the_detail_and_is_counted_in_metrics(client, caplog):
    """The 503 carried the exception's text (torch and CUDA messages, file paths) to every caller, and the
    failed requests were counted in /v1/status but not in /metrics."""
    engine = client.app[ENGINE]
    runner_execute = engine.runner.execute

    def fails_once(out):  # what a CUDA out-of-memory in the model step does
        engine.runner.execute = runner_execute
        raise RuntimeError(INTERNAL)

    engine.runner.execute = fails_once
    error = await error_of(await client.post("/v1/poems", json={"mode": "greedy"}), 503)
    assert error["code"] == "unavailable" and "CUDA" not in error["message"] and "/opt" not in error["message"]
    assert any(INTERNAL in r.getMessage() or INTERNAL in str(r.exc_info and r.exc_info[1]) for r in caplog.records)
    assert (await (await client.get("/v1/status")).json())["requests"]["failed"] == 1
    assert await failed_count(client) == "1.0"
    assert (await client.post("/v1/poems", json={"mode": "greedy"})).status == 200  # it keeps serving


async def test_a_step_loop_that_dies_answers_a_plain_503_and_counts_the_request_failed(client, caplog):
    engine = client.app[ENGINE]

    def broken(now):  # a bug outside the runner's own error handling
        raise RuntimeError(INTERNAL)

    engine.scheduler.schedule = broken  # the loop is idle: it meets this with the next request
    error = await error_of(await client.post("/v1/poems", json={"mode": "greedy"}), 503)
    assert "step loop stopped" in error["message"] and "CUDA" not in error["message"]
    assert any(r.exc_info and INTERNAL in str(r.exc_info[1]) for r in caplog.records)
    assert (await (await client.get("/v1/status")).json())["requests"]["failed"] == 1
    assert await failed_count(client) == "1.0"


async def test_a_request_the_http_parser_refuses_gets_aiohttps_plain_400_as_documented(client):
    """docs/ENGINE.md names this one exception to "errors are always JSON": aiohttp's parser answers before any
    middleware runs. Should this fail, aiohttp changed how it answers: update the docs."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    reply = await asyncio.wait_for(reader.read(), timeout=60)  # to its end: the connection closes after it
    writer.close()
    head = reply.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.0 400") and b"text/plain" in head


def test_a_result_as_json_holds_every_field_and_reads_back():
    from dataclasses import fields

    from engine.api import PoemResult

    result = PoemResult(poem="月落。", lines=["月落"], form="qijue", mode="beam", model={"name": "lstm", "version": "v1"},
                        elapsed_ms=1.5, notes=["n"], score=-3.25, tune=None)
    data = result.to_dict()
    assert list(data) == [f.name for f in fields(PoemResult)]  # a field added to the class reaches the JSON
    assert PoemResult.from_dict(json.loads(json.dumps(data))) == result
    data["lines"].append("x"), data["model"].update(name="y")
    assert result.lines == ["月落"] and result.model["name"] == "lstm"  # a copy, not the result's own lists
