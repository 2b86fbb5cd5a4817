"""End to end on a tiny corpus: the trainer publishes, the engine serves and hot-swaps, a rollback returns.

trainer publishes v1 → the engine serves v1 → the corpus grows → a scheduled run (1 s interval) publishes
v2 → the engine's watcher swaps to v2 while a stream of requests runs, none failing → a corrupt v3 put in
the store is refused and v2 keeps serving → `python -m trainer rollback` returns the store to v1 and the
engine follows.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from conftest import make_poems, write_corpus
from engine_fixtures import engine_settings
from test_retrain import add_poems, tiny_config

from engine.model import versions as store
from engine.api import PoemRequest
from engine.poem.forms import FORMS, classify
from engine.serving.local import LocalEngine
from trainer import daemon
from trainer.retrain import read_run_records, retrain

MODES = ("greedy", "sample", "beam")


async def serving_version(engine) -> str:
    return (await engine.models())[0]["version"]


async def request_stream(engine, until, timeout: float = 120.0) -> list:
    """Batches of mixed requests until `until()` holds; every result or exception is returned."""
    results, deadline, i = [], time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        batch = [engine.generate(PoemRequest(form=list(FORMS)[k % 4], mode=MODES[k % 3], seed=k, beam_width=3))
                 for k in range(i, i + 6)]
        results += await asyncio.gather(*batch, return_exceptions=True)
        i += 6
        if await until():
            return results
    raise AssertionError(f"timed out; last records: {read_run_records(engine.settings.checkpoint_dir)[-2:]}")


async def test_scheduled_retrain_publishes_and_the_engine_swaps_without_failing_a_request(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", make_poems(400, seed=1))
    cfg = tiny_config(tmp_path, corpus, max_steps=60)
    v1 = (await asyncio.to_thread(retrain, cfg, reason="test"))["version"]
    root = Path(cfg.store)

    settings = engine_settings(root, model_names=("lstm",), watch_interval=0.2)
    async with LocalEngine(settings) as engine:
        assert await serving_version(engine) == v1

        # The corpus grows; the daemon's job fires every second; the engine watches the store.
        add_poems(corpus, make_poems(80, seed=2))
        cfg.max_steps = 30
        scheduler = daemon.build_scheduler(cfg, scheduler_cls=BackgroundScheduler, trigger=IntervalTrigger(seconds=1))
        scheduler.start()
        try:
            async def swapped():
                return await serving_version(engine) != v1
            results = await request_stream(engine, swapped)
        finally:
            scheduler.shutdown(wait=True)
        v2 = store.current_version(root, "lstm")
        assert v2 != v1 and await serving_version(engine) == v2
        assert not [r for r in results if isinstance(r, BaseException)]
        assert all(classify(r.lines) is FORMS[r.form] for r in results)
        assert {r.model["version"] for r in results} <= {v1, v2}
        assert read_run_records(root)[1]["outcome"] == "published" and read_run_records(root)[1]["version"] == v2

        # A v3 that rots on a bad disk after CURRENT named it (set_current itself refuses a file that does
        # not load): refused, v2 keeps serving.
        good = store.version_path(root, "lstm", v2).read_bytes()
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0xFF
        v3 = "29990101T000000000Z"
        store.version_path(root, "lstm", v3).write_bytes(bytes(bad))
        (root / "lstm" / "CURRENT").write_text(f"{v3}\n")
        report = await engine.reload()
        assert report["lstm"]["status"] == "refused"
        assert await serving_version(engine) == v2
        poem = await engine.generate(PoemRequest(prompt="月", form="qijue", seed=1))
        assert poem.model["version"] == v2 and poem.poem.startswith("月")


async def test_a_rollback_on_the_command_line_is_followed_by_the_engine(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", make_poems(400, seed=1))
    cfg = tiny_config(tmp_path, corpus, max_steps=60)
    v1 = (await asyncio.to_thread(retrain, cfg))["version"]
    add_poems(corpus, make_poems(80, seed=2))
    cfg.max_steps = 30
    v2 = (await asyncio.to_thread(retrain, cfg))["version"]
    root = Path(cfg.store)
    async with LocalEngine(engine_settings(root, model_names=("lstm",), watch_interval=0.2)) as engine:
        assert await serving_version(engine) == v2
        from trainer.__main__ import main

        assert main(["rollback", "--store", str(root), "--name", "lstm"]) == 0
        assert store.current_version(root, "lstm") == v1

        async def back_to_v1():
            return await serving_version(engine) == v1
        results = await request_stream(engine, back_to_v1, timeout=10)
        assert not [r for r in results if isinstance(r, BaseException)]
