"""Daily poems: one post per subscribed chat per day at its HH:MM in TIMEZONE, on PTB's job queue.

    daily = Daily(store, commands, send, timezone, grace=timedelta(hours=2), job_queue=app.job_queue)
    await daily.add_all_jobs()  # one job per chat at its next slot, named "daily:<chat_id>"
    await daily.catch_up()     # on start: a slot missed within the grace window is posted now

Once only, across restarts. Every post goes through `post_if_due`, which (1) finds the chat's latest slot
(today's HH:MM, or yesterday's if today's is still ahead), (2) gives up if the slot is older than the
grace window, already claimed, or older than the subscription, (3) writes the poem, (4) *claims* the
slot — one conditional UPDATE that sets last_posted_date and succeeds for one caller only — and only
then (5) sends. Claiming before sending gives "never twice": a crash between claim and send loses that
day's poem instead of repeating it; claiming after sending would repeat it (at-least-once). Writing the
poem before claiming means an engine failure costs no claim: the job retries a minute later within the
grace window; so does a failure to record the poem after the claim (the claim is released). A send that
Telegram surely refused (RetryAfter after the limiter's retries) releases the claim, as does a connection
that was never made (nothing left); a read timeout might have been delivered, so the claim stays.

Store calls are awaited through `store.aio` (the store's worker thread), so a database locked by another
process holds up only the post that waits for it; a claim that cannot get the lock within the busy timeout
raises, changes nothing, and the post is not sent.

Each chat's job is armed for its next slot only (`next_slot`) and arms the one after when it runs. Slots are
compared as instants: a time a spring-forward change skips (02:30) falls an hour later on the clock (03:30),
and a time a fall-back change repeats is its first occurrence.

A chat that removed the bot (Forbidden, or "chat not found") gets its subscription paused and its job
removed; `/daily HH:MM` there resumes it.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Awaitable, Callable
from zoneinfo import ZoneInfo

import httpx
from apscheduler.jobstores.base import JobLookupError

from telegram.error import BadRequest, ChatMigrated, Forbidden, RetryAfter, TelegramError
from telegram.ext import ContextTypes, JobQueue

from bot.commands import OPENINGS, Commands, PoemUnavailable, Reply, utc_now
from bot.db import Store, Subscription

log = logging.getLogger(__name__)

RETRY_SECONDS = 60  # engine busy at post time: try again about this much later (within the grace window)
RETRY_JITTER = 0.5  # ± this fraction, so chats that failed together do not all come back in the same second


def surely_not_sent(error: BaseException) -> bool:
    """True when the request never reached the Bot API: no connection was made (refused, DNS, connect
    timeout) or no pooled connection was free. PTB wraps httpx's error as the cause."""
    return isinstance(error.__cause__, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def job_name(chat_id: int) -> str:
    """The chat's slot job (and its id in the scheduler)."""
    return f"daily:{chat_id}"


def retry_name(chat_id: int) -> str:
    """The chat's pending retry, after a post failed in a way a retry can mend."""
    return f"daily-retry:{chat_id}"


def slot_on(day: dt.date, hhmm: str, tz: ZoneInfo) -> dt.datetime:
    """HH:MM of `day` in `tz`. A time a spring-forward change skips reads with the offset before the change
    (fold 0), so it falls that much later on the clock; a time a fall-back change repeats is the first."""
    hour, minute = (int(x) for x in hhmm.split(":"))
    return dt.datetime.combine(day, dt.time(hour, minute), tzinfo=tz)


def latest_slot(hhmm: str, now: dt.datetime, tz: ZoneInfo) -> dt.datetime:
    """The most recent HH:MM in `tz` at or before `now` (today's, or yesterday's if today's is ahead)."""
    # NOTE: compared with `now` in UTC: two datetimes of one tzinfo compare by their wall clocks, which a
    # skipped hour sets apart from their instants.
    now, day = now.astimezone(dt.timezone.utc), now.astimezone(tz).date()
    slot = slot_on(day, hhmm, tz)
    return slot if slot <= now else slot_on(day - dt.timedelta(days=1), hhmm, tz)


def next_slot(hhmm: str, now: dt.datetime, tz: ZoneInfo) -> dt.datetime:
    """The first HH:MM in `tz` after `now` (today's, or tomorrow's once today's has come)."""
    now, day = now.astimezone(dt.timezone.utc), now.astimezone(tz).date()
    slot = slot_on(day, hhmm, tz)
    return slot if slot > now else slot_on(day + dt.timedelta(days=1), hhmm, tz)


class Daily:
    def __init__(self, store: Store, commands: Commands, send: Callable[[int, Reply], Awaitable[object]],
                 timezone: ZoneInfo, grace: dt.timedelta, job_queue: JobQueue | None = None,
                 clock: Callable[[], dt.datetime] = utc_now):
        if grace < dt.timedelta(minutes=1):
            # The job itself runs a moment after HH:MM:00; with no grace every post would be "too late".
            raise ValueError(f"the daily grace window must be at least one minute, got {grace}")
        self.store, self.commands, self.send = store, commands, send
        self.timezone, self.grace, self.job_queue, self.clock = timezone, grace, job_queue, clock

    def due_slot(self, sub: Subscription, now: dt.datetime) -> dt.datetime | None:
        """The slot this subscription still owes a post for at `now`, or None."""
        if sub.paused:
            return None
        slot = latest_slot(sub.time, now, self.timezone)
        if now - slot > self.grace:
            return None  # too late today: wait for the next slot
        if sub.last_posted_date is not None and sub.last_posted_date >= slot.date().isoformat():
            return None
        if sub.since is not None and slot < dt.datetime.fromisoformat(sub.since):
            return None  # the subscription (or its new time) began after this slot
        return slot

    async def post_if_due(self, chat_id: int) -> bool:
        """Post today's poem to `chat_id` if it is owed and nobody else has; True when it was sent."""
        sub = await self.store.aio.subscription(chat_id)
        if sub is None or self.due_slot(sub, self.clock()) is None:
            return False
        opening = self.commands.rng.choice(OPENINGS)
        settings = await self.store.aio.chat_settings(chat_id)
        try:
            result = await self.commands.generate(chat_id, prompt=opening, form=sub.form, tune=sub.tune,
                                                  settings=settings)
        except PoemUnavailable as e:
            if not e.busy:
                # The request itself is refused (no model writes 词 any more, a tune the engine no longer
                # knows): asking again every minute would not change that. Paused, with the reason, until
                # someone sends /daily again.
                await self.pause(chat_id, e.reply.splitlines()[-1])
                return False
            log.warning("daily post for chat %s: no poem (%s); retrying in about %ss", chat_id,
                        e.reply.splitlines()[-1], RETRY_SECONDS)
            self.retry_later(chat_id)
            return False
        # Re-read: the slot may have been claimed while the poem was being written.
        sub = await self.store.aio.subscription(chat_id)
        slot = self.due_slot(sub, self.clock()) if sub else None
        if slot is None:
            return False
        date, previous = slot.date().isoformat(), sub.last_posted_date
        if not await self.store.aio.claim_daily_post(chat_id, date):
            return False
        # The message: text, or (channels, and chats with /card on) the card with the text as its caption.
        try:
            reply = await self.commands.sent_poem(chat_id, sub.chat_type, None, "daily", result, settings,
                                                  prompt=opening)
        except Exception:
            # Nothing was sent (the poem's record or card failed, e.g. a locked database): the claim goes back.
            log.exception("daily post for chat %s: the poem could not be recorded; retrying", chat_id)
            await self.store.aio.release_daily_post(chat_id, date, previous)
            self.retry_later(chat_id)
            return False
        try:
            await self.send(chat_id, reply)
        except Forbidden as e:
            await self.pause(chat_id, f"Forbidden: {e.message}")
            return False
        except BadRequest as e:
            if "chat not found" in e.message.lower():
                await self.pause(chat_id, f"BadRequest: {e.message}")
            else:
                log.error("daily post for chat %s refused: %s", chat_id, e.message)
                await self.store.aio.release_daily_post(chat_id, date, previous)
            return False
        except ChatMigrated as e:
            # The group became a supergroup (a new id) and the migration's service message never reached us:
            # Telegram refused this one, so the poem goes to the new id now.
            await self.store.aio.release_daily_post(chat_id, date, previous)
            await self.move_chat(chat_id, e.new_chat_id)
            return await self.post_if_due(e.new_chat_id)
        except RetryAfter:
            # The rate limiter already retried; Telegram surely did not take it, so another try may post it.
            await self.store.aio.release_daily_post(chat_id, date, previous)
            self.retry_later(chat_id)
            return False
        except TelegramError as e:
            if surely_not_sent(e):
                log.warning("daily post for chat %s not sent (%s); retrying", chat_id, e)
                await self.store.aio.release_daily_post(chat_id, date, previous)
                self.retry_later(chat_id)
                return False
            # A read timeout or a broken answer may still have delivered it: keep the claim (never twice).
            log.warning("daily post for chat %s may not have arrived: %s", chat_id, e)
            return False
        log.info("daily post sent to chat %s for %s", chat_id, date)
        return True

    async def catch_up(self) -> int:
        """On start: post every slot missed while the bot was down (within the grace window). Returns the count."""
        sent = 0
        for sub in await self.store.aio.active_subscriptions():
            sent += await self.post_if_due(sub.chat_id)
        return sent

    async def move_chat(self, old: int, new: int) -> None:
        """The chat `old` is now `new` (a group upgraded to a supergroup): its rows move, its jobs follow."""
        if await self.store.aio.move_chat(old, new):
            log.info("chat %s became chat %s (a supergroup): its settings and daily poem moved", old, new)
        self.remove_job(old)
        await self.set_job(new)

    async def pause(self, chat_id: int, reason: str) -> None:
        log.warning("pausing the daily poem of chat %s: %s", chat_id, reason)
        await self.store.aio.pause_subscription(chat_id, reason)
        self.remove_job(chat_id)

    # the job queue

    async def add_all_jobs(self) -> int:
        subs = await self.store.aio.active_subscriptions()
        for sub in subs:
            await self.set_job(sub.chat_id)
        return len(subs)

    async def set_job(self, chat_id: int) -> None:
        """(Re)set the chat's jobs from its stored subscription: its next slot, and a retry soon while today's
        post is still owed. Removes the old ones first."""
        if self.job_queue is None:
            return
        sub = await self.store.aio.subscription(chat_id)
        # No await from here on: two calls for one chat cannot interleave and leave two jobs.
        self.remove_job(chat_id)
        if sub is None or sub.paused:
            return
        self._arm_slot(chat_id, sub)
        if self.due_slot(sub, self.clock()) is not None:
            self.retry_later(chat_id)  # a post still owed (its retry went with the old job): soon, not tomorrow

    async def arm_next_slot(self, chat_id: int) -> None:
        """After a slot's job ran: the chat's next slot (none once unsubscribed or paused). Its retries are
        post_if_due's to arm, for the failures a retry can mend."""
        if self.job_queue is None:
            return
        try:
            sub = await self.store.aio.subscription(chat_id)
        except Exception:
            # NOTE: nothing else would arm this chat's next post: try again soon rather than lose the chain.
            log.exception("daily poem of chat %s: its next slot could not be read; trying again soon", chat_id)
            self._arm(daily_job, RETRY_SECONDS, job_name(chat_id), chat_id)
            return
        if sub is not None and not sub.paused:
            self._arm_slot(chat_id, sub)

    def _arm_slot(self, chat_id: int, sub: Subscription) -> None:
        # NOTE: one slot at a time, at an instant computed here, not run_daily: APScheduler's cron trigger
        # skips the day after a spring-forward change for times soon after midnight (apscheduler#606).
        # The job queue keeps real time, whatever `self.clock` says.
        self._arm(daily_job, next_slot(sub.time, utc_now(), self.timezone), job_name(chat_id), chat_id)

    def _arm(self, callback, when: dt.datetime | float, name: str, chat_id: int) -> None:
        # NOTE: the job's id is its name, so arming it again replaces it and removing it scans no other job.
        # No misfire limit: a job that fires late (loop busy, clock jump) still runs, and post_if_due decides;
        # a slot's job dropped as missed would arm no next one.
        self.job_queue.run_once(callback, when, name=name, chat_id=chat_id, data=self,
                                job_kwargs={"id": name, "replace_existing": True, "misfire_grace_time": None})

    def remove_job(self, chat_id: int) -> None:
        """Remove the chat's slot job and any pending retry."""
        if self.job_queue is None:
            return
        for name in (job_name(chat_id), retry_name(chat_id)):
            try:
                self.job_queue.scheduler.remove_job(name)
            except JobLookupError:
                pass

    def retry_later(self, chat_id: int) -> None:
        if self.job_queue is not None:
            delay = RETRY_SECONDS * random.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)
            self._arm(retry_job, delay, retry_name(chat_id), chat_id)


async def daily_job(context: ContextTypes.DEFAULT_TYPE) -> None:
    """A slot's job: post this chat's poem if it is due, then arm the chat's next slot."""
    daily, chat_id = context.job.data, context.job.chat_id
    try:
        await post_or_retry(daily, chat_id)
    finally:
        await daily.arm_next_slot(chat_id)


async def retry_job(context: ContextTypes.DEFAULT_TYPE) -> None:
    """A retry's job: post this chat's poem if it is still due."""
    await post_or_retry(context.job.data, context.job.chat_id)


async def post_or_retry(daily: Daily, chat_id: int) -> None:
    """post_if_due; a failure it does not handle itself (a database locked past the busy timeout at a read or
    the claim: nothing was claimed or sent) arms a retry, within the grace window like any other."""
    try:
        await daily.post_if_due(chat_id)
    except Exception:
        log.exception("daily post for chat %s failed; retrying in about %ss", chat_id, RETRY_SECONDS)
        daily.retry_later(chat_id)
