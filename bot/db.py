"""The bot's SQLite store (sqlite-utils): chat settings, daily subscriptions, poem history, feedback.

    store = Store.open("var/bot.db")          # WAL mode; migrates the schema to SCHEMA_VERSION
    store.update_chat_settings(42, mode="beam", beam_width=5)
    store.chat_settings(42)                   # -> ChatSettings(form="qijue", mode="beam", …, card=None)
    store.subscribe(42, "08:00", "wujue")
    store.claim_daily_post(42, "2026-05-01")  # True once per chat and date, however often it is asked

Every write commits before it returns, so a restart (or a kill) loses nothing that was acknowledged.
Every write takes the write lock first and waits up to the busy timeout for another process's lock
(then raises sqlite3.OperationalError, having changed nothing). So async code never waits on the event
loop: it awaits `store.aio.<method>(…)`, which runs the call on the store's one worker thread.

    settings = await store.aio.chat_settings(42)
The schema version lives in `PRAGMA user_version`; `MIGRATIONS[i]` takes version i to i + 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import sqlite_utils

from engine.api import DEFAULT_TEMPERATURE
from engine.poem.forms import DEFAULT_FORM


@dataclass
class ChatSettings:
    form: str = DEFAULT_FORM  # qijue | wujue | qilv | wulv
    mode: str = "beam"  # greedy | sample | beam; beam-5 read best in both blind panels (docs/PERFORMANCE.md)
    beam_width: int = 5  # 1–16, beam mode
    temperature: float = DEFAULT_TEMPERATURE  # (0, 2], sample mode
    model: str | None = None  # None = the engine's default model
    card: bool | None = None  # poems as pictures (/card on|off); None = the default: on in channels only


@dataclass
class Subscription:
    chat_id: int
    time: str  # "HH:MM" in the bot's TIMEZONE
    form: str | None  # None = the chat's form at posting time; "ci" with `tune`
    paused: bool  # set when Telegram says the bot left the chat (Forbidden)
    last_posted_date: str | None  # "YYYY-MM-DD" (TIMEZONE) of the last slot claimed
    paused_reason: str | None = None
    since: str | None = None  # UTC ISO time the current time was set; earlier slots are not owed
    chat_type: str | None = None  # private | group | supergroup | channel, as of /daily (None: subscribed before v3)
    tune: str | None = None  # the 词 tune when form is ci (/daily 08:00 浣溪沙)


# The local console chat's chat and user id (bot.console): no Telegram chat or user has it, so a /daily tried
# in the console is stored but never posted to Telegram by `python -m bot run`.
CONSOLE_CHAT = 0


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _migrate_1(db: sqlite_utils.Database) -> None:
    """The first schema."""
    db["chats"].create({"chat_id": int, "form": str, "mode": str, "beam_width": int, "temperature": float,
                        "model": str, "updated_at": str}, pk="chat_id")
    db["subscriptions"].create({"chat_id": int, "time": str, "form": str, "paused": int, "paused_reason": str,
                                "last_posted_date": str, "created_at": str}, pk="chat_id",
                               defaults={"paused": 0})
    db["poems"].create({"id": int, "chat_id": int, "user_id": int, "source": str, "prompt": str, "acrostic": str,
                        "form": str, "mode": str, "model": str, "model_version": str, "poem": str,
                        "created_at": str}, pk="id")
    db["poems"].create_index(["chat_id", "created_at"])
    db["feedback"].create({"poem_id": int, "user_id": int, "value": int, "created_at": str},
                          pk=("poem_id", "user_id"), foreign_keys=[("poem_id", "poems", "id")])


def _migrate_2(db: sqlite_utils.Database) -> None:
    """/daily off keeps the row (inactive) so its last_posted_date survives a resubscribe the same day."""
    db.execute("ALTER TABLE subscriptions ADD COLUMN active INTEGER NOT NULL DEFAULT 1")


def _migrate_3(db: sqlite_utils.Database) -> None:
    """Cards and 🔁: the chat's /card setting; each poem's keywords, beam width and temperature, so 🔁 asks
    again with the very same settings; the chat type a subscription was made in (daily posts to channels
    go out as pictures)."""
    db.execute("ALTER TABLE chats ADD COLUMN card INTEGER")
    db.execute("ALTER TABLE poems ADD COLUMN keywords TEXT")
    db.execute("ALTER TABLE poems ADD COLUMN beam_width INTEGER")
    db.execute("ALTER TABLE poems ADD COLUMN temperature FLOAT")
    db.execute("ALTER TABLE subscriptions ADD COLUMN chat_type TEXT")


def _migrate_4(db: sqlite_utils.Database) -> None:
    """词: the tune of a poem (🔁 writes the same tune again) and of a daily subscription."""
    db.execute("ALTER TABLE poems ADD COLUMN tune TEXT")
    db.execute("ALTER TABLE subscriptions ADD COLUMN tune TEXT")


def _migrate_5(db: sqlite_utils.Database) -> None:
    """次韵: the rhyme characters a poem answered (🔁 answers with them again)."""
    db.execute("ALTER TABLE poems ADD COLUMN rhymes TEXT")


MIGRATIONS = [_migrate_1, _migrate_2, _migrate_3, _migrate_4, _migrate_5]
SCHEMA_VERSION = len(MIGRATIONS)


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection):
    """One write transaction that takes the write lock first (BEGIN IMMEDIATE). Waiting for another
    process's lock then goes through SQLite's busy handler (up to the busy timeout); a deferred BEGIN
    whose transaction reads before it writes would get "database is locked" at once instead. On any
    error the transaction rolls back, so a write that cannot get the lock changes nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def migrate(db: sqlite_utils.Database) -> int:
    """Bring the schema to SCHEMA_VERSION in one transaction (all or nothing; each schema page written to the
    WAL once, which on a nearly full disk is what lets the bot start); returns the version found."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found == SCHEMA_VERSION:
        return found
    # NOTE: the version is read again under the write lock: two processes opening one file together (the bot
    # and a console chat) would otherwise both run the same migration, and the second one fail.
    with write_transaction(db.conn):
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise RuntimeError(f"database schema v{found} is newer than this bot (v{SCHEMA_VERSION}); upgrade the bot")
        for migration in MIGRATIONS[found:]:
            migration(db)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return found


def _enable_wal(db: sqlite_utils.Database, timeout: float) -> None:
    """Switch the file to WAL. NOTE: switching does not wait for the busy handler: a second process opening a
    new file at the same moment gets "database is locked" at once; it waits and looks again, and the other
    process's switch is as good as its own."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            db.enable_wal()
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            time.sleep(0.05)


def _serialised(method):
    """One call at a time on the store's connection: its transactions must not interleave across threads."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class Store:
    """Small, precisely named reads and writes over one sqlite-utils Database. Thread-safe (each call holds
    the store's lock); from async code use `store.aio`, so that no call runs on the event loop."""

    def __init__(self, db: sqlite_utils.Database):
        self.db = db
        self._lock = threading.RLock()
        # For async code: the same methods, to be awaited, each run off the event loop (its worker thread
        # starts with the first call).
        self.aio = AsyncStore(self)

    @classmethod
    def open(cls, path: str | Path, busy_timeout: float = 10.0) -> Store:
        """Open (creating) the file, switch to WAL, migrate. ":memory:" works for tests. A write waits up to
        `busy_timeout` seconds for another connection's write lock."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: calls come from the store's worker thread (store.aio) and from plain
        # callers; the store's lock serialises them.
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=busy_timeout)
        db = sqlite_utils.Database(conn)
        if str(path) != ":memory:":
            _enable_wal(db, busy_timeout)
        migrate(db)
        return cls(db)

    def close(self) -> None:
        """Let calls already made through `aio` finish, then close the connection. May wait up to the busy
        timeout: from async code, `await asyncio.to_thread(store.close)`."""
        self.aio.shutdown()
        with self._lock:
            self.db.close()

    def _write(self):
        """One write transaction on the store's connection (write_transaction)."""
        return write_transaction(self.db.conn)

    @_serialised
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    # chat settings

    @_serialised
    def chat_settings(self, chat_id: int) -> ChatSettings:
        """The chat's settings, defaults for a chat never seen."""
        try:
            row = self.db["chats"].get(chat_id)
        except sqlite_utils.db.NotFoundError:
            return ChatSettings()
        defaults = ChatSettings()
        settings = ChatSettings(**{f.name: row[f.name] if row[f.name] is not None else getattr(defaults, f.name)
                                   for f in fields(ChatSettings)})
        settings.card = None if settings.card is None else bool(settings.card)  # stored as 0/1
        return settings

    @_serialised
    def update_chat_settings(self, chat_id: int, **changes) -> ChatSettings:
        """Change some settings (callers validate first); returns the new whole."""
        unknown = set(changes) - {f.name for f in fields(ChatSettings)}
        if unknown:
            raise TypeError(f"unknown chat settings: {sorted(unknown)}")
        with self._write():  # read and write in one transaction: a concurrent change is not lost
            merged = asdict(self.chat_settings(chat_id)) | changes
            self.db["chats"].upsert({"chat_id": chat_id, **merged, "updated_at": _now()}, pk="chat_id")
        return ChatSettings(**merged)

    # subscriptions

    @_serialised
    def subscription(self, chat_id: int) -> Subscription | None:
        """The chat's subscription, or None when it has none (never subscribed, or /daily off)."""
        row = self._subscription_row(chat_id)
        return _subscription(row) if row is not None and row["active"] else None

    def _subscription_row(self, chat_id: int) -> dict | None:
        return self._row("subscriptions", chat_id)

    def _row(self, table: str, pk: int) -> dict | None:
        """The row with primary key `pk`, or None."""
        try:
            return self.db[table].get(pk)
        except sqlite_utils.db.NotFoundError:
            return None

    @_serialised
    def active_subscriptions(self) -> list[Subscription]:
        """The subscriptions the bot posts: active, not paused, and not the console's (CONSOLE_CHAT)."""
        return [_subscription(r) for r in self.db["subscriptions"].rows_where(
            "paused = 0 AND active = 1 AND chat_id != ?", [CONSOLE_CHAT], order_by="chat_id")]

    @_serialised
    def subscribe(self, chat_id: int, time: str, form: str | None, since: dt.datetime | None = None,
                  chat_type: str | None = None, tune: str | None = None) -> Subscription:
        """Subscribe (or change the time/form, and unpause) as of `since` (default now). Keeps
        last_posted_date, also across /daily off, so moving today's time later does not post a second poem today.
        An active subscription whose time stays keeps its start too, so changing only the form does not drop
        a post still owed (a slot being retried). `chat_type`: where /daily was sent (channels get their daily
        poem as a picture)."""
        with self._write():
            old = self._subscription_row(chat_id)
            same = old is not None and old["active"] and not old["paused"] and old["time"] == time
            self.db["subscriptions"].upsert({
                "chat_id": chat_id, "time": time, "form": form, "tune": tune, "paused": 0, "paused_reason": None,
                "active": 1,
                "last_posted_date": old["last_posted_date"] if old else None,
                "chat_type": chat_type or (old["chat_type"] if old else None),
                "created_at": old["created_at"] if same else
                (since or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc).isoformat(timespec="seconds"),
            }, pk="chat_id")
        return self.subscription(chat_id)

    @_serialised
    def unsubscribe(self, chat_id: int) -> bool:
        """Stop the subscription; False when there was none. The row stays, inactive, keeping the date of
        the last post, so subscribing again the same day does not post that day twice."""
        with self._write():
            cursor = self.db.execute("UPDATE subscriptions SET active = 0 WHERE chat_id = ? AND active = 1",
                                     [chat_id])
        return cursor.rowcount > 0

    @_serialised
    def pause_subscription(self, chat_id: int, reason: str) -> None:
        with self._write():
            self.db.execute("UPDATE subscriptions SET paused = 1, paused_reason = ? WHERE chat_id = ?",
                            [reason, chat_id])

    @_serialised
    def move_chat(self, old: int, new: int) -> bool:
        """A group Telegram upgraded to a supergroup, which has a new id: its settings, subscription and poems
        (so the buttons under them work there) move to `new`. Settings or a subscription `new` already has
        are its own and stay; the old id's are then dropped, since nothing can be posted to it any more.
        True when anything moved."""
        with self._write():
            moved = 0
            for table in ("chats", "subscriptions"):
                if self.db.execute(f"SELECT 1 FROM {table} WHERE chat_id = ?", [new]).fetchone() is None:
                    moved += self.db.execute(f"UPDATE {table} SET chat_id = ? WHERE chat_id = ?", [new, old]).rowcount
                else:
                    self.db.execute(f"DELETE FROM {table} WHERE chat_id = ?", [old])
            moved += self.db.execute("UPDATE poems SET chat_id = ? WHERE chat_id = ?", [new, old]).rowcount
        return moved > 0

    @_serialised
    def claim_daily_post(self, chat_id: int, date: str) -> bool:
        """Atomically mark `date`'s post as taken; True only for the one caller that moved it forward.

        One UPDATE with the condition in its WHERE clause, so two jobs (or a job and the start-up
        catch-up) racing for the same date cannot both win."""
        with self._write():
            cursor = self.db.execute(
                "UPDATE subscriptions SET last_posted_date = ? WHERE chat_id = ? AND paused = 0 AND active = 1 "
                "AND (last_posted_date IS NULL OR last_posted_date < ?)", [date, chat_id, date])
        return cursor.rowcount == 1

    @_serialised
    def release_daily_post(self, chat_id: int, date: str, previous: str | None) -> None:
        """Undo a claim whose poem surely never left (the engine failed before sending)."""
        with self._write():
            self.db.execute("UPDATE subscriptions SET last_posted_date = ? WHERE chat_id = ? AND last_posted_date = ?",
                            [previous, chat_id, date])

    # poems and feedback

    @_serialised
    def record_poem(self, chat_id: int, user_id: int | None, source: str, result, prompt: str = "",
                    acrostic: str | None = None, keywords=(), beam_width: int | None = None,
                    temperature: float | None = None, rhymes: str | None = None) -> int:
        """Store a poem (a PoemResult) that is about to be sent; returns its id for the buttons. With the
        request's keywords, rhymes, beam width and temperature, 🔁 can ask for another with the same settings."""
        with self._write():
            table = self.db["poems"].insert({
                "chat_id": chat_id, "user_id": user_id, "source": source, "prompt": prompt, "acrostic": acrostic,
                "form": result.form, "mode": result.mode, "model": (result.model or {}).get("name"),
                "model_version": (result.model or {}).get("version"), "poem": result.poem, "created_at": _now(),
                "keywords": json.dumps(list(keywords or []), ensure_ascii=False), "beam_width": beam_width,
                "temperature": temperature, "tune": getattr(result, "tune", None), "rhymes": rhymes,
            })
        return table.last_pk

    @_serialised
    def poem(self, poem_id: int) -> dict | None:
        return self._row("poems", poem_id)

    @_serialised
    def recent_poems(self, chat_id: int, limit: int = 10) -> list[dict]:
        return list(self.db["poems"].rows_where("chat_id = ?", [chat_id], order_by="id desc", limit=limit))

    @_serialised
    def record_feedback(self, poem_id: int, user_id: int, value: int) -> None:
        """One vote per user and poem (+1 or -1); voting again replaces the vote."""
        if value not in (1, -1):
            raise ValueError("feedback value must be 1 or -1")
        with self._write():
            self.db["feedback"].upsert({"poem_id": poem_id, "user_id": user_id, "value": value,
                                        "created_at": _now()}, pk=("poem_id", "user_id"))

    @_serialised
    def feedback_counts(self, poem_id: int) -> tuple[int, int]:
        """(👍, 👎) for one poem."""
        up, down = self.db.execute(
            "SELECT COALESCE(SUM(value = 1), 0), COALESCE(SUM(value = -1), 0) FROM feedback WHERE poem_id = ?",
            [poem_id]).fetchone()
        return int(up), int(down)

    @_serialised
    def counts(self) -> dict[str, int]:
        """Totals for /status."""
        one = lambda sql: self.db.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "chats": one("SELECT COUNT(*) FROM chats"),
            "subscriptions": one("SELECT COUNT(*) FROM subscriptions WHERE paused = 0 AND active = 1"),
            "paused_subscriptions": one("SELECT COUNT(*) FROM subscriptions WHERE paused = 1 AND active = 1"),
            "poems": one("SELECT COUNT(*) FROM poems"),
            "likes": one("SELECT COUNT(*) FROM feedback WHERE value = 1"),
            "dislikes": one("SELECT COUNT(*) FROM feedback WHERE value = -1"),
        }


def _subscription(row: dict) -> Subscription:
    return Subscription(chat_id=row["chat_id"], time=row["time"], form=row["form"], paused=bool(row["paused"]),
                        last_posted_date=row["last_posted_date"], paused_reason=row["paused_reason"],
                        since=row["created_at"], chat_type=row["chat_type"], tune=row.get("tune"))


def poem_keywords(row: dict) -> list[str]:
    """A stored poem's keywords (none for poems stored before schema v3)."""
    try:
        words = json.loads(row.get("keywords") or "[]")
    except ValueError:
        return []
    return [w for w in words if isinstance(w, str)] if isinstance(words, list) else []


class AsyncStore:
    """A Store's methods for async code: `await store.aio.subscribe(…)` runs `store.subscribe(…)` on one worker
    thread owned by this store. A call waiting for another process's write lock (up to the busy timeout) then
    holds up only the coroutines awaiting the store; the event loop goes on answering everything else. One
    worker, so calls run one at a time and in the order they were made."""

    NOT_AWAITED = frozenset({"open", "close"})  # close() waits for the worker, so it must not run on it

    def __init__(self, store: Store):
        self._store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")

    def __getattr__(self, name: str):
        method = getattr(self._store, name) if not name.startswith("_") and name not in self.NOT_AWAITED else None
        if not callable(method):  # __getattr__ answers "no such attribute" with AttributeError
            raise AttributeError(f"AsyncStore has no method {name!r}")  # noqa: TRY004

        async def call(*args, **kwargs):
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(method, *args, **kwargs))

        call.__name__ = call.__qualname__ = name
        return call

    def shutdown(self) -> None:
        """Let calls already made finish, then stop the worker."""
        self._executor.shutdown(wait=True)
