"""Load (issue 7, docs/RELIABILITY.md): far more concurrent requests than the queue holds, in process, over
HTTP and through the bot.

    .venv/bin/python -m pytest tests/test_load.py -q                  # bounded (CI)
    YINSHI_SOAK=1 .venv/bin/python -m pytest tests/test_load.py -q    # the long soak variants too

Properties, none of them timed: every request is either refused at admission (QueueFullError / 503 with
Retry-After, counted as rejected, never queued) or completes with a valid poem; the Python heap does not
grow from one round of overload to the next; afterwards nothing is queued, running or waiting, and the
engine writes poems. Through the bot, every message of many chats at once is answered exactly once.
"""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc

import pytest

from bot.commands import BUSY
from bot.db import Store
from bot_fixtures import all_updates_handled, make_settings, running_bot
from engine.model import versions as ckpt_store
from engine.api import PoemRequest
from engine.errors import QueueFullError
from engine.poem.forms import FORMS, classify
from engine.serving.local import LocalEngine
from engine.serving.service import ENGINE, ServiceSettings, create_app
from engine_fixtures import engine_settings
from fake_bot_api import FakeBotApi

SOAK = os.environ.get("YINSHI_SOAK") == "1"
soak = pytest.mark.skipif(not SOAK, reason="soak run: set YINSHI_SOAK=1")
PROMPTS = "月山水花风云春秋天人江河日夜明清白青长空"


@pytest.fixture
def lstm_store(tmp_path, tiny_checkpoint):
    root = tmp_path / "checkpoints"
    ckpt_store.publish(root, "lstm", tiny_checkpoint)
    return root


def small_engine(root, **overrides) -> LocalEngine:
    values = dict(model_names=("lstm",), max_num_rows=16, max_queue=4, threads=1)
    values.update(overrides)
    return LocalEngine(engine_settings(root, **values))


def request(k: int) -> PoemRequest:
    mode = ("greedy", "sample", "beam")[k % 3]
    return PoemRequest(prompt=PROMPTS[k % len(PROMPTS)], form="wujue", mode=mode, beam_width=2, seed=k)


async def overload(engine: LocalEngine, n: int, offset: int = 0) -> tuple[int, int]:
    """n requests at once; returns (completed, rejected) and checks every outcome."""
    outcomes = await asyncio.gather(*(engine.generate(request(offset + k)) for k in range(n)), return_exceptions=True)
    completed = rejected = 0
    for k, outcome in enumerate(outcomes):
        if isinstance(outcome, QueueFullError):
            assert outcome.retry_after > 0
            rejected += 1
        else:
            assert not isinstance(outcome, BaseException), repr(outcome)
            assert classify(outcome.lines) is FORMS["wujue"] and outcome.poem.startswith(PROMPTS[(offset + k) % len(PROMPTS)])
            completed += 1
    return completed, rejected


async def assert_idle_and_healthy(engine: LocalEngine) -> None:
    status = await engine.status()
    assert status["ready"] and status["queue_depth"] == 0 and status["running_requests"] == 0
    assert status["running_rows"] == 0 and not engine._futures
    result = await engine.generate(PoemRequest(prompt="月", form="wujue", mode="greedy"))
    assert classify(result.lines) is FORMS["wujue"]


async def _overload_rounds(lstm_store, rounds: int, per_round: int):
    async with small_engine(lstm_store) as engine:
        warm = await overload(engine, per_round)  # warm-up: caches, mask tables, thread start
        gc.collect()
        tracemalloc.start()
        try:
            totals = [0, 0]
            sizes = []
            for r in range(rounds):
                done, refused = await overload(engine, per_round, offset=(r + 1) * per_round)
                totals[0] += done
                totals[1] += refused
                gc.collect()
                sizes.append(tracemalloc.get_traced_memory()[0])
        finally:
            tracemalloc.stop()
        counts = engine.counts
        assert totals[1] > 0 and totals[0] > 0  # the queue really overflowed, and work still got done
        # Refused ones were counted and never queued; accepted ones all completed.
        assert counts["rejected"] == warm[1] + totals[1] and counts["completed"] == warm[0] + totals[0]
        assert counts["failed"] == counts["expired"] == counts["cancelled"] == 0
        # Bounded memory: the heap after the last round is within 1 MiB of the heap after the first.
        assert sizes[-1] - sizes[0] < 1 << 20, sizes
        await assert_idle_and_healthy(engine)
        print(f"\nload/in-process: {rounds}x{per_round} at once, max_queue=4: completed {totals[0]}, "
              f"rejected {totals[1]}; traced heap after each round (bytes): {sizes}")
        return totals, sizes


async def test_overload_in_process_refuses_the_excess_completes_the_rest_and_memory_stays_flat(lstm_store):
    await _overload_rounds(lstm_store, rounds=4, per_round=150)


@pytest.mark.soak
@soak
async def test_soak_overload_in_process(lstm_store):
    await _overload_rounds(lstm_store, rounds=30, per_round=500)


async def test_overload_with_a_short_deadline_refuses_what_cannot_finish_and_the_admitted_all_finish_in_time(
        lstm_store):
    # Scaled down from 3,000 beam-16 requests with a 60 s deadline over HTTP, which gave 504s: requests
    # admitted by queue length waited out their deadline. Here the queue is long enough for all of them,
    # so only the estimated wait can refuse.
    timeout, n = 2.0, 600
    async with small_engine(lstm_store, max_num_rows=64, max_queue=10_000) as engine:
        await engine.generate(PoemRequest(prompt="月", form="wujue", mode="beam", beam_width=16))  # measured steps

        def beam(k):
            return PoemRequest(prompt=PROMPTS[k % len(PROMPTS)], form="wujue", mode="beam", beam_width=16, seed=k,
                               timeout=timeout)
        outcomes = await asyncio.gather(*(engine.generate(beam(k)) for k in range(n)), return_exceptions=True)
        counts = dict(engine.counts)
        await assert_idle_and_healthy(engine)
    unexpected = [o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, QueueFullError)]
    assert not unexpected, {repr(o) for o in unexpected}  # no TimeoutError (504), nothing else
    poems = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, QueueFullError)]
    assert poems and counts["expired"] == 0 and counts["rejected"] == len(refused)
    assert all(r.retry_after >= 1 for r in refused)
    for poem in poems:  # admitted ones finish before their deadline (the engine would have expired them)
        assert classify(poem.lines) is FORMS["wujue"] and poem.elapsed_ms < timeout * 1000
    print(f"\nload/deadline: {n} beam-16 at once, {timeout:g} s deadline: {len(poems)} done, {len(refused)} refused")


async def _overload_http(aiohttp_client, lstm_store, n: int):
    settings = ServiceSettings(engine=engine_settings(lstm_store, model_names=("lstm",), max_num_rows=16, max_queue=4,
                                                      threads=1))
    client = await aiohttp_client(create_app(settings))

    async def post(k):
        req = request(k)
        resp = await client.post("/v1/poems", json={"prompt": req.prompt, "form": "wujue", "mode": req.mode,
                                                    "beam_width": 2, "seed": k})
        return resp.status, await resp.json(), resp.headers.get("Retry-After")

    answers = await asyncio.gather(*(post(k) for k in range(n)))
    ok = [body for status, body, _ in answers if status == 200]
    full = [(body, retry) for status, body, retry in answers if status == 503]
    assert len(ok) + len(full) == n, {status for status, _, _ in answers}
    assert ok and full
    for body, retry in full:
        assert body["error"]["code"] == "queue_full" and int(retry) >= 1
    for body in ok:
        assert classify(body["lines"]) is FORMS["wujue"]
    engine = client.app[ENGINE]
    assert engine.counts["rejected"] == len(full) and engine.counts["completed"] == len(ok)
    await assert_idle_and_healthy(engine)
    assert (await client.get("/readyz")).status == 200
    metrics = await (await client.get("/metrics")).text()
    assert f"yinshi_rejections_total {float(len(full))}" in metrics
    print(f"\nload/http: {n} at once, max_queue=4: 200 x{len(ok)}, 503 x{len(full)}")
    return len(ok), len(full)


async def test_overload_over_http_is_only_200s_and_503s_with_retry_after(aiohttp_client, lstm_store):
    await _overload_http(aiohttp_client, lstm_store, 200)


@pytest.mark.soak
@soak
async def test_soak_overload_over_http(aiohttp_client, lstm_store):
    await _overload_http(aiohttp_client, lstm_store, 2000)


async def _many_chats(tmp_path, lstm_store, chats: int, per_chat: int):
    api = FakeBotApi()
    await api.start()
    settings = make_settings(tmp_path, telegram_base_url=api.base_url)
    store = Store.open(settings.database_path)
    engine = small_engine(lstm_store, max_queue=8)
    await engine.start()
    try:
        async with running_bot(settings, engine, store) as app:
            for k in range(per_chat):
                for chat in range(1, chats + 1):
                    api.message(chat, f"/poem {PROMPTS[(chat + k) % len(PROMPTS)]}")
            await api.wait_for_sent(chats * per_chat, timeout=120)
            await all_updates_handled(app, api)  # nothing these updates cause can still be sent
    finally:
        await engine.close()
        await api.stop()
        store.close()
    by_chat: dict[int, list[str]] = {}
    for m in api.sent:
        by_chat.setdefault(m["chat_id"], []).append(m["text"])
    busy = 0
    assert sorted(by_chat) == list(range(1, chats + 1))
    for chat, texts in by_chat.items():
        assert len(texts) == per_chat, (chat, texts)  # exactly once each
        asked = [PROMPTS[(chat + k) % len(PROMPTS)] for k in range(per_chat)]
        poems = [t[0] for t in texts if t != BUSY]
        busy += len(texts) - len(poems)
        assert all(p in asked for p in poems) and len(set(poems)) == len(poems), (chat, texts)
    assert engine.counts["completed"] == chats * per_chat - busy
    print(f"\nload/bot: {chats} chats x {per_chat} messages: {len(api.sent)} replies, {busy} busy, "
          f"{engine.counts['rejected']} refused at the queue")
    return busy


async def test_many_chats_at_once_through_the_bot_each_message_answered_exactly_once(tmp_path, lstm_store):
    await _many_chats(tmp_path, lstm_store, chats=40, per_chat=2)


@pytest.mark.soak
@soak
async def test_soak_many_chats(tmp_path, lstm_store):
    await _many_chats(tmp_path, lstm_store, chats=300, per_chat=5)
