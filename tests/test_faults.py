"""Faults (issue 7, docs/RELIABILITY.md): corrupted files, an engine restarted under the bot, Bot API errors,
a locked SQLite database and a full disk.

    .venv/bin/python -m pytest tests/test_faults.py -q

Trainer SIGKILL during training and publishing is covered where the trainer lives:
tests/test_training.py::test_resume_after_kill_9_continues_from_the_saved_step_and_ends_where_an_unbroken_run_ends
and tests/test_store.py::test_sigkill_while_publishing_always_leaves_current_naming_a_complete_version.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import random
import sqlite3
import struct
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
from aiohttp import web

from bot.commands import BUSY, STORE_BUSY, Commands, Who
from bot.db import Store
from bot_fixtures import ScriptedEngine, all_updates_handled, fake_api, make_settings, running_bot  # noqa: F401 (fixture)
from engine.model import versions as ckpt_store
from engine.model.checkpoint import CheckpointError, load_checkpoint
from engine.serving.client import EngineClient
from engine.serving.service import ENGINE, ServiceSettings, create_app
from engine_fixtures import engine_settings
from trainer.corpus import CorpusError, load_corpus

ROOT = Path(__file__).resolve().parent.parent
FLIPS, TRUNCATIONS, RANDOM_FILES = 400, 120, 40


# -- corrupted checkpoints ------------------------------------------------------------------------------------

def _load_outcome(path: Path) -> str:
    """'loaded' or 'refused'; anything but CheckpointError naming the file fails the test."""
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        assert str(path) in str(e), e
        return "refused"
    return "loaded"


def test_a_checkpoint_with_any_bit_flipped_is_refused_or_still_whole(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    rng, bad = random.Random(7), tmp_path / "flipped.safetensors"
    outcomes = {"header": [], "weights": []}
    for k in range(FLIPS):
        offset = rng.randrange(header_end) if k % 2 else rng.randrange(header_end, len(data))
        flipped = bytearray(data)
        flipped[offset] ^= 1 << rng.randrange(8)
        bad.write_bytes(flipped)
        outcomes["header" if offset < header_end else "weights"].append(_load_outcome(bad))
    # Every flip in the tensor bytes is caught by the weights' SHA-256; a flip in the JSON header may land
    # in a field nothing checks (a date, a metric) and load — see docs/RELIABILITY.md.
    assert set(outcomes["weights"]) == {"refused"}
    assert outcomes["header"].count("refused") > len(outcomes["header"]) // 2


def test_a_checkpoint_truncated_anywhere_is_refused(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    bad = tmp_path / "cut.safetensors"
    step = max(1, len(data) // TRUNCATIONS)
    offsets = sorted({0, 1, 7, 8, 9, len(data) - 1, *range(0, len(data), step)})
    for n in offsets:
        bad.write_bytes(data[:n])
        assert _load_outcome(bad) == "refused", n


def test_random_bytes_and_other_formats_under_a_checkpoint_name_are_refused(tmp_path):
    rng, bad = random.Random(3), tmp_path / "junk.safetensors"
    samples = [rng.randbytes(rng.randrange(0, 4096)) for _ in range(RANDOM_FILES)]
    samples += [b"", b"\x00" * 64, struct.pack("<Q", 2**63) + b"{}", struct.pack("<Q", 10) + b'{"a":1}   ',
                struct.pack("<Q", 2) + b"{}", b"PK\x03\x04" + b"\x00" * 100, b"\x89HDF\r\n\x1a\n"]
    for sample in samples:
        bad.write_bytes(sample)
        assert _load_outcome(bad) == "refused"
    (tmp_path / "dir.safetensors").mkdir()
    assert _load_outcome(tmp_path / "dir.safetensors") == "refused"
    assert _load_outcome(tmp_path / "missing.safetensors") == "refused"


# -- corrupted corpus files -----------------------------------------------------------------------------------

def _corpus_outcome(root: Path, file: Path, content: bytes) -> str:
    file.write_bytes(content)
    try:
        load_corpus([root])
    except CorpusError as e:
        assert str(file) in str(e) or str(root) in str(e), e
        return "refused"
    return "loaded"


@pytest.fixture
def one_file_corpus(tmp_path):
    from conftest import make_poems, write_corpus

    root = write_corpus(tmp_path / "corpus", make_poems(40, seed=5), per_file=40)
    [file] = (root / "全唐诗").glob("*.json")
    return root, file, file.read_bytes()


def test_a_corpus_file_flipped_truncated_or_replaced_by_junk_gives_only_corpus_errors(one_file_corpus):
    root, file, data = one_file_corpus
    rng = random.Random(11)
    outcomes = []
    for _ in range(200):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        outcomes.append(_corpus_outcome(root, file, bytes(flipped)))
    for n in range(0, len(data), max(1, len(data) // 80)):
        assert _corpus_outcome(root, file, data[:n]) == "refused", n
    for _ in range(30):
        assert _corpus_outcome(root, file, rng.randbytes(rng.randrange(0, 2000))) == "refused"
    assert "refused" in outcomes  # (many flips land inside a poem's text and it still reads)


@pytest.mark.parametrize("content", [
    b"1" * 5000,  # json: ValueError, integer past the 4300-digit limit
    b"[" * 100_000,  # json: RecursionError
    json.dumps([{"paragraphs": ["\ud800月山水花，风云春秋天。"]}]).encode(),  # OpenCC: UnicodeEncodeError
    json.dumps([{"paragraphs": ["月山水花风，云春秋天人。"], "author": "\udc00"}]).encode(),
    json.dumps([{"paragraphs": ["月山水花风，云春秋天人。"], "rhythmic": "浣溪沙\ud800"}]).encode(),
], ids=["long-integer", "deep-nesting", "surrogate-in-text", "surrogate-in-author", "surrogate-in-tune"])
def test_a_corpus_file_with_pathological_json_gives_a_corpus_error(one_file_corpus, content):
    root, file, _ = one_file_corpus
    assert _corpus_outcome(root, file, content) in ("refused", "loaded")


# -- the engine restarted while the bot runs ------------------------------------------------------------------

class EngineService:
    """The engine's aiohttp app on a fixed local port that can be stopped and started again."""

    def __init__(self, settings: ServiceSettings, port: int = 0):
        self.settings, self.port, self.runner = settings, port, None

    async def start(self) -> str:
        self.runner = web.AppRunner(create_app(self.settings))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
        self.runner = None


@pytest.fixture
def lstm_store(tmp_path, tiny_checkpoint):
    root = tmp_path / "checkpoints"
    ckpt_store.publish(root, "lstm", tiny_checkpoint)
    return root


async def test_the_bot_answers_busy_while_the_engine_restarts_and_recovers_by_itself(tmp_path, fake_api, lstm_store):
    service = EngineService(ServiceSettings(engine=engine_settings(lstm_store, model_names=("lstm",), threads=1)))
    url = await service.start()
    client = EngineClient(url, retries=2, backoff=0.05, max_backoff=0.2)
    settings = make_settings(tmp_path, telegram_base_url=fake_api.base_url)
    store = Store.open(settings.database_path)
    try:
        async with running_bot(settings, client, store) as app:
            fake_api.message(1, "/poem 月")
            await fake_api.wait_for_sent(1, chat_id=1, timeout=30)
            await service.stop()  # the engine goes away (drains what it had)
            fake_api.message(2, "/poem 山")
            await fake_api.wait_for_sent(1, chat_id=2, timeout=30)
            await service.start()  # same port: the bot was told nothing
            fake_api.message(3, "/poem 水")
            await fake_api.wait_for_sent(1, chat_id=3, timeout=30)
            await all_updates_handled(app, fake_api)
    finally:
        await client.close()
        if service.runner is not None:
            await service.stop()
        store.close()
    replies = {m["chat_id"]: m["text"] for m in fake_api.sent}
    assert len(fake_api.sent) == 3  # each message answered exactly once
    assert replies[1].startswith("月") and replies[3].startswith("水")
    assert replies[2] == BUSY


async def test_requests_the_engine_holds_when_it_stops_are_finished_not_dropped(tmp_path, lstm_store):
    """A stop drains: every request the engine has taken in when the stop begins gets its poem. (A request
    that arrives once the engine is gone gets BUSY: test_the_bot_answers_busy_while_the_engine_restarts_….)"""
    service = EngineService(ServiceSettings(engine=engine_settings(lstm_store, model_names=("lstm",), threads=1)))
    url = await service.start()
    engine = service.runner.app[ENGINE]
    store = Store.open(tmp_path / "bot.db")
    async with EngineClient(url, retries=1, backoff=0.05) as client:
        commands = Commands(client, store, make_settings(tmp_path))
        who = [Who(chat_id=i, user_id=i) for i in range(1, 9)]
        await commands.handle(who[0], "/beam 16")
        tasks = [asyncio.ensure_future(commands.handle(w, "/poem 月")) for w in who]
        # Stop only once every request is inside the engine (waiting, running or done), not still on its way:
        # a request still connecting when the listener closes is the other, BUSY, path.
        for _ in range(3000):
            status = await engine.status()
            if status["queue_depth"] + status["running_requests"] + status["requests"]["completed"] == len(who):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"the engine never held all {len(who)} requests: {status}")
        await service.stop()
        replies = await asyncio.gather(*tasks)
    store.close()
    assert [reply.text[0] for reply in replies] == ["月"] * len(who), [reply.text for reply in replies]


# -- Bot API errors --------------------------------------------------------------------------------------------

async def test_repeated_429s_are_waited_out_and_each_reply_arrives_once(tmp_path, fake_api):
    settings = make_settings(tmp_path, telegram_base_url=fake_api.base_url)
    store = Store.open(settings.database_path)
    fake_api.fail_next("sendMessage", 429, retry_after=1, times=2)
    async with running_bot(settings, ScriptedEngine(), store) as app:
        fake_api.message(1, "/poem 月")
        fake_api.message(2, "/poem 山")
        await fake_api.wait_for_sent(2, timeout=30)
        await all_updates_handled(app, fake_api)
    store.close()
    assert sorted(m["chat_id"] for m in fake_api.sent) == [1, 2]
    assert len(fake_api.calls_of("sendMessage")) == 4  # two refused, two delivered


async def test_get_updates_failing_with_5xx_and_429_is_retried_and_nothing_is_lost_or_repeated(tmp_path, fake_api):
    settings = make_settings(tmp_path, telegram_base_url=fake_api.base_url)
    store = Store.open(settings.database_path)
    async with running_bot(settings, ScriptedEngine(), store) as app:
        await fake_api.wait_for_calls("getUpdates")
        fake_api.fail_next("getUpdates", 502)
        fake_api.fail_next("getUpdates", 429, retry_after=1)
        for chat in range(1, 6):
            fake_api.message(chat, f"/poem {'月山水花风'[chat - 1]}")
        await fake_api.wait_for_sent(5, timeout=30)
        await all_updates_handled(app, fake_api)
    store.close()
    assert sorted(m["chat_id"] for m in fake_api.sent) == [1, 2, 3, 4, 5]
    assert {m["chat_id"]: m["text"][0] for m in fake_api.sent} == dict(zip(range(1, 6), "月山水花风"))


async def test_a_5xx_on_send_is_logged_and_the_user_hears_once(tmp_path, fake_api, caplog):
    settings = make_settings(tmp_path, telegram_base_url=fake_api.base_url)
    store = Store.open(settings.database_path)
    fake_api.fail_next("sendMessage", 500)
    with caplog.at_level(logging.ERROR, logger="bot.telegram_app"):
        async with running_bot(settings, ScriptedEngine(), store) as app:
            fake_api.message(1, "/poem 月")
            await fake_api.wait_for_sent(1, timeout=30)
            await all_updates_handled(app, fake_api)
    store.close()
    assert len(fake_api.sent) == 1 and "Something went wrong" in fake_api.sent[0]["text"]
    assert [r for r in caplog.records if r.exc_info]  # recorded with its traceback


async def test_a_chat_that_blocked_the_bot_is_recorded_not_retried_and_others_are_served(tmp_path, fake_api, caplog):
    settings = make_settings(tmp_path, telegram_base_url=fake_api.base_url)
    store = Store.open(settings.database_path)
    fake_api.forbidden_chats.add(66)
    with caplog.at_level(logging.ERROR, logger="bot.telegram_app"):
        async with running_bot(settings, ScriptedEngine(), store) as app:
            fake_api.message(66, "/poem 月")
            fake_api.message(1, "/poem 山")
            await fake_api.wait_for_sent(1, chat_id=1, timeout=30)
            await all_updates_handled(app, fake_api)
    store.close()
    assert [p["chat_id"] for p in fake_api.calls_of("sendMessage")].count(66) == 1  # no retry, no apology
    assert [m["chat_id"] for m in fake_api.sent] == [1]
    assert any("Forbidden" in repr(r.exc_info) for r in caplog.records if r.exc_info)


# -- SQLite busy / locked ---------------------------------------------------------------------------------------

@pytest.fixture
def locked_store(tmp_path):
    """The bot's store, and a second connection holding the write lock (as a stuck process would)."""
    path = tmp_path / "bot.db"
    store = Store.open(path)
    store.update_chat_settings(42, form="wulv", mode="beam", beam_width=3)
    store.db.conn.execute("PRAGMA busy_timeout = 200")  # production waits 10 s; the outcome is the same
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("UPDATE chats SET form = 'qijue' WHERE chat_id = 42")  # uncommitted
    yield store, other, path
    other.close()
    store.close()


@pytest.mark.parametrize("text", ["/beam 7", "/form 七律", "/daily 08:00", "/poem 月", "/greedy"])
async def test_a_locked_database_gives_a_clear_reply_and_changes_nothing(tmp_path, locked_store, text):
    store, other, path = locked_store
    commands = Commands(ScriptedEngine(), store, make_settings(tmp_path))
    before = asdict(store.chat_settings(42))
    reply = await commands.handle(Who(chat_id=42, user_id=42), text)
    assert reply.text == STORE_BUSY and reply.poem_id is None
    other.execute("ROLLBACK")
    assert asdict(store.chat_settings(42)) == before and store.subscription(42) is None
    assert store.counts()["poems"] == 0
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    # Once the lock is gone the same command works.
    assert (await commands.handle(Who(chat_id=42, user_id=42), text)).text != STORE_BUSY


def _hold_write_lock(path: Path, locked: threading.Event, release: threading.Event, bound: float) -> dict:
    """Start a thread that takes the database's write lock (BEGIN IMMEDIATE on its own connection, as a second
    bot process, a backup or an sqlite3 shell would) and keeps it until `release` is set or `bound` seconds
    pass; the returned dict says, once the thread is done, whether `release` came in time."""
    outcome: dict = {}

    def hold():
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            outcome["released_in_time"] = release.wait(bound)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    outcome["thread"] = threading.Thread(target=hold, name="lock holder", daemon=True)
    outcome["thread"].start()
    return outcome


WRITER_CHAT, HELP_CHAT, LOCK_BOUND = 7001, 7002, 30.0
# A write command, its reply when it went through, and whether its change is in the store.
WRITES = {
    "/form 五律": ("诗体：五律", lambda store: store.chat_settings(WRITER_CHAT).form == "wulv"),
    "/daily off": ("已取消每日一诗", lambda store: store.subscription(WRITER_CHAT) is None),
}


@pytest.mark.parametrize("busy_timeout_s", [120.0, 0.3], ids=["lock-released-within-busy-timeout",
                                                              "lock-outlives-busy-timeout"])
@pytest.mark.parametrize("write", list(WRITES))
async def test_a_write_waiting_for_a_locked_database_does_not_stall_other_chats(tmp_path, fake_api, write,
                                                                                busy_timeout_s):
    """Another process holds the write lock; a write command waits for it, and /help (no store) in another
    chat is still answered while the lock is held: store calls run off the event loop. The lock is released
    only after /help's reply arrived (or after LOCK_BOUND s, and the test fails). With a busy timeout longer
    than the lock is held, the write then goes through; with a short one, the lock is kept until the write
    command has answered, which must be the store-busy reply, with nothing changed."""
    success_text, changed = WRITES[write]
    settings = make_settings(tmp_path, telegram_base_url=fake_api.base_url)
    # 120 s, longer than LOCK_BOUND: a bot that blocks its event loop in the write cannot answer /help in time.
    store = Store.open(settings.database_path, busy_timeout=busy_timeout_s)
    store.subscribe(WRITER_CHAT, "08:00", None)
    locked, release = threading.Event(), threading.Event()
    async with running_bot(settings, ScriptedEngine(), store) as app:
        holder = _hold_write_lock(settings.database_path, locked, release, LOCK_BOUND)
        assert await asyncio.to_thread(locked.wait, LOCK_BOUND)
        # One getUpdates batch, the write first: its handler reaches the store before /help's runs.
        fake_api.message(WRITER_CHAT, write)
        fake_api.message(HELP_CHAT, "/help")
        try:
            [help_reply] = await fake_api.wait_for_sent(1, chat_id=HELP_CHAT, timeout=LOCK_BOUND + 30)
            if busy_timeout_s < LOCK_BOUND:  # keep the lock until the write has given up
                [write_reply] = await fake_api.wait_for_sent(1, chat_id=WRITER_CHAT, timeout=LOCK_BOUND)
        finally:
            release.set()
            await asyncio.to_thread(holder["thread"].join)
        assert holder["released_in_time"], (
            f"/help was not answered within {LOCK_BOUND:g} s while another connection held the write lock: "
            f"the event loop was blocked by {write}'s write")
        assert "/help" in help_reply["text"]
        [write_reply] = await fake_api.wait_for_sent(1, chat_id=WRITER_CHAT, timeout=LOCK_BOUND)
        await all_updates_handled(app, fake_api)
    if busy_timeout_s >= LOCK_BOUND:  # the lock went away within the busy timeout: the write went through
        assert write_reply["text"].startswith(success_text), write_reply["text"]
        assert changed(store)
    else:  # the lock outlived the busy timeout: rolled back, nothing changed, and the user was told
        assert write_reply["text"] == STORE_BUSY
        assert not changed(store)
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.close()


# -- a full disk --------------------------------------------------------------------------------------------------

def _publish_under_file_size_limit(root: Path, checkpoint: Path, limit: int) -> dict:
    """publish() in a child whose writes past `limit` bytes fail with EFBIG (RLIMIT_FSIZE): a disk that fills."""
    code = f"""
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
from engine.model import versions as store
try:
    store.publish({str(root)!r}, "lstm", {str(checkpoint)!r})
    print(json.dumps({{"ok": True}}))
except Exception as e:
    print(json.dumps({{"ok": False, "type": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_store_consistent(root: Path, version: str) -> None:
    assert ckpt_store.current_version(root, "lstm") == version
    assert ckpt_store.versions(root, "lstm") == [version]
    assert not [p for p in root.rglob("*.tmp")]  # no half-written copy left behind
    load_checkpoint(ckpt_store.current_path(root, "lstm"))


def _second_version(tiny_checkpoint: Path, dst: Path) -> Path:
    ckpt = load_checkpoint(tiny_checkpoint)
    from engine.model.checkpoint import save_checkpoint

    save_checkpoint(dst, ckpt.model, ckpt.vocab, meta={"metrics": ckpt.meta.get("metrics", {})})
    return dst


def test_a_disk_that_fills_during_publish_gives_a_clear_error_and_keeps_the_store(tmp_path, tiny_checkpoint):
    root = tmp_path / "store"
    first = ckpt_store.publish(root, "lstm", tiny_checkpoint)
    second = _second_version(tiny_checkpoint, tmp_path / "v2.safetensors")
    result = _publish_under_file_size_limit(root, second, limit=second.stat().st_size // 2)
    assert not result["ok"] and result["type"] == "StoreError", result
    assert "too large" in result["message"].lower(), result  # EFBIG's strerror, named in one clear line
    _assert_store_consistent(root, first)


@pytest.fixture
def tiny_tmpfs(tmp_path, tiny_checkpoint):
    """A tmpfs with room for one checkpoint and a bit: a real full disk. Needs root; skipped otherwise."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    size = tiny_checkpoint.stat().st_size + 24 * 1024
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); the RLIMIT_FSIZE test covers it")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_tmpfs_refuses_the_second_version_and_the_first_keeps_serving(tmp_path, tiny_checkpoint, tiny_tmpfs):
    root = tiny_tmpfs / "store"
    first = ckpt_store.publish(root, "lstm", tiny_checkpoint)
    second = _second_version(tiny_checkpoint, tmp_path / "v2.safetensors")
    with pytest.raises(ckpt_store.StoreError, match="No space left on device"):
        ckpt_store.publish(root, "lstm", second)
    _assert_store_consistent(root, first)


async def test_a_full_disk_under_the_bot_database_gives_a_clear_reply(tiny_tmpfs, tmp_path):
    path = tiny_tmpfs / "bot.db"
    store = Store.open(path)
    store.update_chat_settings(42, beam_width=3, mode="beam")
    filler = tiny_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # take every free byte
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    commands = Commands(ScriptedEngine(), store, make_settings(tmp_path))
    replies = [await commands.handle(Who(chat_id=1000 + i, user_id=1000 + i), f"/beam {1 + i % 16}")
               for i in range(40)]
    assert STORE_BUSY in {r.text for r in replies}  # the disk really filled up
    filler.unlink()
    assert store.chat_settings(42).beam_width == 3
    assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.close()
