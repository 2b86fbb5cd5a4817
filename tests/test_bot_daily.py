"""bot.daily without Telegram: slots, the grace window, once-only across restarts, pausing, retries."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import threading

import pytest
from telegram.error import BadRequest, Forbidden, RetryAfter, TimedOut

from bot.commands import Commands
from bot.daily import Daily, latest_slot
from bot.db import Store
from bot_fixtures import *  # noqa: F401,F403
from bot_fixtures import TZ, make_settings, run_in_threads
from engine.errors import QueueFullError

CHAT = -100500


class Outbox:
    """A send() that records, or raises the next queued error."""

    def __init__(self):
        self.sent: list[tuple[int, str]] = []
        self.errors: list[BaseException] = []

    async def __call__(self, chat_id, reply):
        if self.errors:
            raise self.errors.pop(0)
        self.sent.append((chat_id, reply.text))


def make_daily(tmp_path, engine, clock, outbox, store=None) -> Daily:
    """A Daily over the SQLite file in tmp_path, as a freshly started bot would have it."""
    store = store or Store.open(tmp_path / "bot.db")
    settings = make_settings(tmp_path)
    return Daily(store, Commands(engine, store, settings, clock=clock), outbox, TZ, dt.timedelta(hours=2),
                 clock=clock)


@pytest.fixture
def outbox():
    return Outbox()


@pytest.fixture
def daily(tmp_path, scripted_engine, clock, outbox):
    d = make_daily(tmp_path, scripted_engine, clock, outbox)
    d.store.subscribe(CHAT, "08:00", "wujue", since=clock())  # subscribed at 07:00
    return d


def test_latest_slot_is_today_once_the_time_has_come_else_yesterday():
    at = lambda h, m: dt.datetime(2026, 5, 1, h, m, tzinfo=TZ)  # noqa: E731
    assert latest_slot("08:00", at(8, 0), TZ) == at(8, 0)
    assert latest_slot("08:00", at(9, 30), TZ) == at(8, 0)
    assert latest_slot("08:00", at(7, 59), TZ) == dt.datetime(2026, 4, 30, 8, 0, tzinfo=TZ)


def test_latest_slot_uses_the_bots_timezone_not_utc():
    now = dt.datetime(2026, 5, 1, 0, 30, tzinfo=dt.timezone.utc)  # 08:30 in Shanghai
    assert latest_slot("08:00", now, TZ) == dt.datetime(2026, 5, 1, 8, 0, tzinfo=TZ)


async def test_nothing_is_posted_before_the_time(daily, clock, outbox):
    clock.set_local("07:59", second=59)
    assert not await daily.post_if_due(CHAT)
    assert outbox.sent == []


async def test_posts_once_at_the_scheduled_minute(daily, clock, outbox, scripted_engine):
    clock.set_local("08:00")
    assert await daily.post_if_due(CHAT)
    assert not await daily.post_if_due(CHAT)
    assert len(outbox.sent) == 1 and scripted_engine.requests[-1].form == "wujue"
    assert daily.store.subscription(CHAT).last_posted_date == "2026-05-01"


async def test_posts_again_the_next_day(daily, clock, outbox):
    clock.set_local("08:00")
    await daily.post_if_due(CHAT)
    clock.set_local("08:00", day=dt.date(2026, 5, 2))
    assert await daily.post_if_due(CHAT)
    assert len(outbox.sent) == 2


async def test_a_restart_after_posting_does_not_post_again(tmp_path, daily, clock, outbox, scripted_engine):
    clock.set_local("08:00")
    await daily.post_if_due(CHAT)
    daily.store.close()
    clock.set_local("08:00", second=40)
    restarted = make_daily(tmp_path, scripted_engine, clock, outbox)
    assert await restarted.catch_up() == 0
    assert not await restarted.post_if_due(CHAT)
    assert len(outbox.sent) == 1


async def test_a_missed_post_is_sent_once_on_start_within_the_grace_window(tmp_path, daily, clock, outbox,
                                                                             scripted_engine):
    daily.store.close()  # the bot was down at 08:00
    clock.set_local("09:30")
    first = make_daily(tmp_path, scripted_engine, clock, outbox)
    assert await first.catch_up() == 1
    first.store.close()
    clock.set_local("09:31")
    second = make_daily(tmp_path, scripted_engine, clock, outbox)
    assert await second.catch_up() == 0
    assert len(outbox.sent) == 1


async def test_a_post_missed_by_more_than_the_grace_window_is_skipped(daily, clock, outbox):
    clock.set_local("10:00", second=1)
    assert await daily.catch_up() == 0 and outbox.sent == []


async def test_catch_up_crosses_midnight(daily, clock, outbox):
    daily.store.subscribe(CHAT, "23:30", None, since=clock())
    clock.set_local("00:10", day=dt.date(2026, 5, 2))
    assert await daily.catch_up() == 1
    assert daily.store.subscription(CHAT).last_posted_date == "2026-05-01"


async def test_a_slot_before_the_subscription_is_not_owed(daily, clock, outbox):
    clock.set_local("09:00")
    daily.store.subscribe(CHAT, "08:30", None, since=clock())
    assert await daily.catch_up() == 0 and outbox.sent == []


class Lockstep:
    """Holds two posters in step so they race where it matters: both writing the poem (both past the first
    "is it due?" check), then both past the re-read, before either claims. Each poster runs in its own thread
    with its own event loop and its own connection to the SQLite file, as two bot processes would; only the
    claim's conditional UPDATE can then keep the post single.

    The engine waits at the first barrier; the clock, first read after the poem (the re-check of the slot,
    just after re-reading the subscription), at the second."""

    def __init__(self, engine, clock):
        self.engine, self.clock = engine, clock
        self.writing, self.rechecked = threading.Barrier(2, timeout=30), threading.Barrier(2, timeout=30)
        self.local = threading.local()

    async def generate(self, request):
        await asyncio.to_thread(self.writing.wait)  # yields: the other poster gets here too
        self.local.poem_written = True
        return await self.engine.generate(request)

    def now(self):
        if getattr(self.local, "poem_written", False) and not getattr(self.local, "rechecked", False):
            self.local.rechecked = True
            self.rechecked.wait()
        return self.clock()

    def __getattr__(self, name):  # models(), status() … as the engine has them
        return getattr(self.engine, name)


def test_two_posters_racing_for_one_slot_post_once(tmp_path, scripted_engine, clock, outbox):
    Store.open(tmp_path / "bot.db").subscribe(CHAT, "08:00", "wujue", since=clock())
    clock.set_local("08:00")
    lockstep = Lockstep(scripted_engine, clock)
    results, errors = [], []

    def poster():
        try:
            store = Store.open(tmp_path / "bot.db")
            daily = Daily(store, Commands(lockstep, store, make_settings(tmp_path), clock=lockstep.now), outbox, TZ,
                          dt.timedelta(hours=2), clock=lockstep.now)
            results.append(asyncio.run(daily.post_if_due(CHAT)))
            store.close()
        except BaseException as e:  # noqa: BLE001 — reported by the test below
            errors.append(e)

    run_in_threads(poster, 2)
    assert errors == []
    assert len(scripted_engine.requests) == 2  # both wrote a poem: they did race
    assert sorted(results) == [False, True] and len(outbox.sent) == 1


async def test_a_busy_engine_costs_no_claim_and_a_later_try_posts(daily, clock, outbox, scripted_engine):
    clock.set_local("08:00")
    scripted_engine.error = QueueFullError(1.0)
    assert not await daily.post_if_due(CHAT)
    assert daily.store.subscription(CHAT).last_posted_date is None
    scripted_engine.error = None
    clock.set_local("08:01")
    assert await daily.post_if_due(CHAT)


@pytest.mark.parametrize("error", [Forbidden("Forbidden: bot was kicked from the group chat"),
                                   BadRequest("Chat not found")])
async def test_a_chat_that_removed_the_bot_gets_its_subscription_paused(daily, clock, outbox, error):
    clock.set_local("08:00")
    outbox.errors.append(error)
    assert not await daily.post_if_due(CHAT)
    sub = daily.store.subscription(CHAT)
    assert sub.paused and ("Forbidden" in sub.paused_reason or "not found" in sub.paused_reason)
    assert daily.store.active_subscriptions() == []
    clock.set_local("08:01")
    assert not await daily.post_if_due(CHAT)  # not retried forever


async def test_a_timeout_keeps_the_claim_because_the_post_may_have_arrived(daily, clock, outbox):
    clock.set_local("08:00")
    outbox.errors.append(TimedOut())
    assert not await daily.post_if_due(CHAT)
    assert not await daily.post_if_due(CHAT)
    assert outbox.sent == []


async def test_a_refused_send_releases_the_claim(daily, clock, outbox):
    clock.set_local("08:00")
    outbox.errors.append(RetryAfter(dt.timedelta(seconds=30)))
    assert not await daily.post_if_due(CHAT)
    assert await daily.post_if_due(CHAT)
    assert len(outbox.sent) == 1


async def test_a_crash_between_claim_and_send_never_posts_twice(tmp_path, daily, clock, outbox, scripted_engine):
    clock.set_local("08:00")
    outbox.errors.append(asyncio.CancelledError())  # the process is being killed mid-send
    with pytest.raises(asyncio.CancelledError):
        await daily.post_if_due(CHAT)
    daily.store.close()
    restarted = make_daily(tmp_path, scripted_engine, clock, outbox)
    assert await restarted.catch_up() == 0 and outbox.sent == []


# -- DAILY_GRACE_MINUTES=0 ------------------------------------------------------------------------------------

def test_a_grace_window_under_one_minute_is_refused():
    from bot.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="DAILY_GRACE_MINUTES"):
        Settings.from_env({"DAILY_GRACE_MINUTES": "0"}, env_file=None)
    assert Settings.from_env({"DAILY_GRACE_MINUTES": "1"}, env_file=None).daily_grace_minutes == 1
    with pytest.raises(ValueError, match="grace"):
        Daily(None, None, None, TZ, dt.timedelta(0))


async def test_with_one_minute_of_grace_the_job_firing_just_after_the_minute_posts(tmp_path, scripted_engine, clock,
                                                                                   outbox):
    store = Store.open(tmp_path / "bot.db")
    d = Daily(store, Commands(scripted_engine, store, make_settings(tmp_path), clock=clock), outbox, TZ,
              dt.timedelta(minutes=1), clock=clock)
    store.subscribe(CHAT, "08:00", None, since=clock())
    clock.now = dt.datetime(2026, 5, 1, 8, 0, 0, 3000, tzinfo=TZ)  # the job runs a few ms after HH:MM:00
    assert await d.post_if_due(CHAT) and len(outbox.sent) == 1


# -- a send that surely never left is retried; one that may have arrived is not -----------------------------

async def _real_connection_error() -> Exception:
    """The exception PTB raises when nothing listens at the Bot API's address (httpx.ConnectError inside)."""
    from conftest import free_port
    from telegram import Bot
    from telegram.error import NetworkError

    from fake_bot_api import TOKEN

    bot = Bot(TOKEN, base_url=f"http://127.0.0.1:{free_port()}/bot")
    try:
        await bot.send_message(CHAT, "x")
    except NetworkError as e:
        return e
    finally:
        await bot.shutdown()
    raise AssertionError("the send did not fail")


async def test_a_connection_error_before_anything_was_sent_releases_the_claim_and_a_retry_posts(daily, clock, outbox):
    clock.set_local("08:00")
    outbox.errors.append(await _real_connection_error())
    assert not await daily.post_if_due(CHAT)
    assert daily.store.subscription(CHAT).last_posted_date is None
    clock.set_local("08:01")
    assert await daily.post_if_due(CHAT)
    assert len(outbox.sent) == 1


# -- /daily off, then a later time the same day -----------------------------------------------------------------

async def test_daily_off_then_a_later_time_the_same_day_does_not_post_twice(daily, clock, outbox):
    from bot.commands import Who

    who = Who(chat_id=CHAT, user_id=None, chat_type="channel")
    clock.set_local("08:00")
    assert await daily.post_if_due(CHAT)
    clock.set_local("08:05")
    await daily.commands.handle(who, "/daily off")
    assert daily.store.subscription(CHAT) is None and daily.store.active_subscriptions() == []
    await daily.commands.handle(who, "/daily 09:00")
    clock.set_local("09:00")
    assert not await daily.post_if_due(CHAT)
    assert len(outbox.sent) == 1
    clock.set_local("09:00", day=dt.date(2026, 5, 2))  # and the next day it posts again
    assert await daily.post_if_due(CHAT)


# -- retries are spread out ---------------------------------------------------------------------------------------

class RecordingJobQueue:
    """Only what Daily.retry_later calls: records each run_once delay."""

    def __init__(self):
        self.delays: list[float] = []

    def run_once(self, callback, when, **kwargs):
        self.delays.append(when)


async def test_retries_after_an_engine_error_are_jittered(daily, clock, scripted_engine):
    daily.job_queue = jobs = RecordingJobQueue()
    scripted_engine.error = QueueFullError(1.0)
    clock.set_local("08:00")
    for chat in range(20):
        daily.store.subscribe(chat, "08:00", None, since=dt.datetime(2026, 5, 1, 7, 0, tzinfo=TZ))
        assert not await daily.post_if_due(chat)
    assert len(jobs.delays) == 20 and len(set(jobs.delays)) > 10
    assert all(30 <= d <= 90 for d in jobs.delays), jobs.delays


# -- a failure after the claim, and /daily while a post is owed -----------------------------------------------------

async def test_a_poem_that_cannot_be_recorded_releases_the_claim_and_a_retry_posts(daily, clock, outbox, monkeypatch):
    import sqlite3

    record = daily.store.record_poem
    calls = []

    def locked_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return record(*args, **kwargs)

    monkeypatch.setattr(daily.store, "record_poem", locked_once)
    clock.set_local("08:00")
    assert not await daily.post_if_due(CHAT)
    assert outbox.sent == [] and daily.store.subscription(CHAT).last_posted_date is None
    clock.set_local("08:01")
    assert await daily.post_if_due(CHAT)
    assert len(outbox.sent) == 1


class FakeJobQueue(RecordingJobQueue):
    """What Daily.set_job calls: jobs at a slot's instant by name, retries' run_once delays, and removals."""

    def __init__(self):
        super().__init__()
        self.slots: list[tuple[str, dt.datetime]] = []
        self.scheduler = self

    def run_once(self, callback, when, name=None, **kwargs):
        if isinstance(when, dt.datetime):
            self.slots.append((name, when))
        else:
            super().run_once(callback, when, name=name, **kwargs)

    def remove_job(self, job_id):
        from apscheduler.jobstores.base import JobLookupError

        raise JobLookupError(job_id)


async def test_changing_only_the_form_keeps_a_post_still_owed(daily, clock, outbox, scripted_engine):
    from bot.commands import Who

    who = Who(chat_id=CHAT, user_id=None, chat_type="channel")
    daily.job_queue = jobs = FakeJobQueue()
    daily.commands.on_subscription_change = daily.set_job
    clock.set_local("08:00")
    scripted_engine.error = QueueFullError(1.0)
    assert not await daily.post_if_due(CHAT)  # owed, a retry pending
    scripted_engine.error = None
    clock.set_local("08:01")
    since = daily.store.subscription(CHAT).since
    jobs.delays.clear()  # the /daily below removes the pending retry with the old job
    await daily.commands.handle(who, "/daily 08:00 qijue")
    assert daily.store.subscription(CHAT).since == since
    assert jobs.delays, "the owed post is retried soon, not left to tomorrow's job"
    clock.set_local("08:02")
    assert await daily.post_if_due(CHAT)
    assert len(outbox.sent) == 1
    # A new time starts the subscription afresh: nothing owed from before it.
    await daily.commands.handle(who, "/daily 07:30")
    assert daily.store.subscription(CHAT).since > since


# -- daylight saving time ------------------------------------------------------------------------------------------

DST_ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Santiago"]


def dst_changes(tz) -> list[dt.date]:
    """The days of 2026 on which `tz`'s offset at noon differs from the day before's."""
    noon = [dt.datetime.combine(dt.date(2026, 1, 1) + dt.timedelta(days=n), dt.time(12), tzinfo=tz) for n in range(365)]
    changes = [b.date() for a, b in zip(noon, noon[1:]) if a.utcoffset() != b.utcoffset()]
    assert len(changes) == 2
    return changes


@pytest.mark.parametrize("zone", DST_ZONES)
def test_slots_agree_with_the_clock_across_dst_changes(zone):
    from zoneinfo import ZoneInfo

    from bot.daily import next_slot

    tz, utc = ZoneInfo(zone), dt.timezone.utc
    changes = dst_changes(tz)
    for hhmm, change in itertools.product(("00:00", "00:30", "01:59", "02:00", "02:30", "03:00", "23:59"), changes):
        now = dt.datetime.combine(change - dt.timedelta(days=2), dt.time(0), tzinfo=utc)
        while now < dt.datetime.combine(change + dt.timedelta(days=3), dt.time(0), tzinfo=utc):
            latest, upcoming = latest_slot(hhmm, now, tz), next_slot(hhmm, now, tz)
            assert latest <= now < upcoming, (hhmm, now, latest, upcoming)
            # One slot a local day, on consecutive days: nothing between the two.
            assert (upcoming.date() - latest.date()).days == 1, (hhmm, now, latest, upcoming)
            assert latest_slot(hhmm, upcoming, tz) == upcoming
            now += dt.timedelta(minutes=7)


class CalendarJobQueue:
    """A job queue that runs on the test's clock: run_daily fires as APScheduler's cron trigger does (what PTB's
    JobQueue.run_daily schedules), run_once at its instant or delay; a job id given in job_kwargs replaces the
    job of that id, as APScheduler's replace_existing does. `run_until` fires jobs in time order."""

    class Job:
        def __init__(self, queue, callback, when, name, chat_id, data, job_id=None, trigger=None):
            self.queue, self.callback, self.when, self.name = queue, callback, when, name
            self.chat_id, self.data, self.id, self.trigger = chat_id, data, job_id, trigger

        def schedule_removal(self):
            self.queue.jobs.remove(self)

    def __init__(self, clock):
        self.clock, self.jobs = clock, []
        self.scheduler = self

    def _add(self, job):
        if job.id is not None:
            self.jobs = [j for j in self.jobs if j.id != job.id]
        self.jobs.append(job)

    def run_daily(self, callback, time, name=None, chat_id=None, data=None, job_kwargs=None, **kwargs):
        from apscheduler.triggers.cron import CronTrigger

        trigger = CronTrigger(hour=time.hour, minute=time.minute, second=time.second, timezone=time.tzinfo)
        when = trigger.get_next_fire_time(None, self.clock())
        self._add(self.Job(self, callback, when, name, chat_id, data, (job_kwargs or {}).get("id"), trigger))

    def run_once(self, callback, when, name=None, chat_id=None, data=None, job_kwargs=None, **kwargs):
        if not isinstance(when, dt.datetime):
            when = self.clock() + dt.timedelta(seconds=when)
        self._add(self.Job(self, callback, when, name, chat_id, data, (job_kwargs or {}).get("id")))

    def get_jobs_by_name(self, name):
        return [j for j in self.jobs if j.name == name]

    def remove_job(self, job_id):
        from apscheduler.jobstores.base import JobLookupError

        if not any(j.id == job_id for j in self.jobs):
            raise JobLookupError(job_id)
        self.jobs = [j for j in self.jobs if j.id != job_id]

    async def run_until(self, end):
        from types import SimpleNamespace

        while self.jobs:
            job = min(self.jobs, key=lambda j: j.when)
            if job.when >= end:
                return
            self.jobs.remove(job)
            self.clock.now = job.when.astimezone(dt.timezone.utc) + dt.timedelta(seconds=1)
            if job.trigger is not None:  # the cron job stays, at its next fire time
                job.when = job.trigger.get_next_fire_time(job.when, job.when)
                self.jobs.append(job)
            await job.callback(SimpleNamespace(job=job))


@pytest.mark.parametrize("zone,hhmm", [("Europe/Berlin", "00:00"), ("Europe/Berlin", "02:30"),
                                       ("America/New_York", "00:30"), ("Australia/Lord_Howe", "02:15")])
async def test_a_daily_poem_arrives_every_day_around_dst_changes(tmp_path, scripted_engine, clock, outbox, zone, hhmm,
                                                                monkeypatch):
    """APScheduler's cron trigger skips the day after a spring-forward change for times just after midnight
    (apscheduler#606): a chat subscribed at 00:00 in Berlin got no poem on 30 March."""
    from zoneinfo import ZoneInfo

    monkeypatch.setattr("bot.daily.utc_now", clock)  # the job queue's time is the test's

    tz = ZoneInfo(zone)
    d = make_daily(tmp_path, scripted_engine, clock, outbox)
    d.timezone, d.job_queue = tz, CalendarJobQueue(clock)
    for first, last in ((day - dt.timedelta(days=3), day + dt.timedelta(days=3)) for day in dst_changes(tz)):
        outbox.sent.clear()
        clock.now = dt.datetime.combine(first, dt.time(12), tzinfo=tz).astimezone(dt.timezone.utc)
        d.store.subscribe(CHAT, hhmm, "wujue", since=clock())
        await d.set_job(CHAT)
        await d.job_queue.run_until(dt.datetime.combine(last, dt.time(12), tzinfo=tz))
        days = (last - first).days
        assert len(outbox.sent) == days, f"{len(outbox.sent)} poems in {days} days"
        d.store.unsubscribe(CHAT)
        d.remove_job(CHAT)


async def test_a_send_telegram_refuses_is_tried_once_a_slot_not_every_minute(tmp_path, scripted_engine, clock, monkeypatch):
    attempts = []

    async def refused(chat_id, reply):
        attempts.append(clock())
        raise BadRequest("Not enough rights to send text messages to the chat")

    monkeypatch.setattr("bot.daily.utc_now", clock)
    d = make_daily(tmp_path, scripted_engine, clock, refused)
    d.job_queue = CalendarJobQueue(clock)
    d.store.subscribe(CHAT, "08:00", "wujue", since=clock())  # 07:00 on 1 May
    await d.set_job(CHAT)
    await d.job_queue.run_until(dt.datetime(2026, 5, 3, 7, 0, tzinfo=TZ))
    assert len(attempts) == 2  # 1 and 2 May: once each, no retries within the grace window


async def test_a_next_slot_that_cannot_be_read_is_armed_again_soon(tmp_path, scripted_engine, clock, outbox, monkeypatch):
    import sqlite3

    monkeypatch.setattr("bot.daily.utc_now", clock)
    d = make_daily(tmp_path, scripted_engine, clock, outbox)
    d.job_queue = CalendarJobQueue(clock)
    d.store.subscribe(CHAT, "08:00", "wujue", since=clock())
    await d.set_job(CHAT)
    read, locked = d.store.aio.subscription, []

    async def subscription(chat_id):
        if locked:
            locked.pop()
            raise sqlite3.OperationalError("database is locked")
        return await read(chat_id)

    async def send(chat_id, reply):
        await outbox(chat_id, reply)
        locked.append(True)  # the read that arms the next slot, right after this post, fails once

    monkeypatch.setattr(d.store.aio, "subscription", subscription)
    d.send = send
    await d.job_queue.run_until(dt.datetime(2026, 5, 4, 7, 0, tzinfo=TZ))
    assert len(outbox.sent) == 3  # 1, 2 and 3 May: the chain of slots went on


async def test_a_daily_subscription_made_in_the_console_is_never_posted(tmp_path, daily, clock, outbox):
    from bot.console import CONSOLE_ID, chat

    async def lines():
        yield "/daily 08:00"

    await chat(daily.commands, lines(), out=__import__("io").StringIO())
    assert daily.store.subscription(CONSOLE_ID).time == "08:00"  # stored, as the console says
    clock.set_local("09:00")
    assert await daily.catch_up() == 1  # the fixture's chat only
    assert [chat_id for chat_id, _ in outbox.sent] == [CHAT]
    assert CONSOLE_ID not in {s.chat_id for s in daily.store.active_subscriptions()}


async def test_a_database_locked_at_the_claim_costs_a_retry_not_the_days_poem(tmp_path, scripted_engine, clock, outbox,
                                                                               monkeypatch):
    import sqlite3

    monkeypatch.setattr("bot.daily.utc_now", clock)
    d = make_daily(tmp_path, scripted_engine, clock, outbox)
    d.job_queue = CalendarJobQueue(clock)
    d.store.subscribe(CHAT, "08:00", "wujue", since=clock())
    await d.set_job(CHAT)
    claim, locked = d.store.aio.claim_daily_post, [True]

    async def claim_once_locked(*args):
        if locked:
            locked.pop()
            raise sqlite3.OperationalError("database is locked")
        return await claim(*args)

    monkeypatch.setattr(d.store.aio, "claim_daily_post", claim_once_locked)
    await d.job_queue.run_until(dt.datetime(2026, 5, 1, 10, 0, tzinfo=TZ))
    assert len(outbox.sent) == 1 and not locked  # 1 May's poem, a minute or so late
