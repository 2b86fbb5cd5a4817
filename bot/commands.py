"""Command handling without any transport: Telegram (bot.telegram_app) and the console (bot.console) both
hand a message's text to `Commands.handle` and send back the `Reply` it returns.

    commands = Commands(engine, store, settings)
    reply = await commands.handle(Who(chat_id=42, user_id=42), "/poem 月")
    reply.text        # the poem and a footer, or a clear message saying what went wrong
    reply.poem_id     # set when the reply is a stored poem (the transport adds 👍 👎 🔁 🖼 buttons)
    reply.photo       # the poem card (PNG) when the chat has cards on; then `text` is its caption
    tap = await commands.tap(who, "again:17")   # a button under poem 17: checked, rate-limited, then acted on

Store calls are awaited through `store.aio`, which runs them on the store's worker thread: a database
locked by another process holds up only the commands that wait for it, never the event loop, and a write
that cannot get the lock within the busy timeout changes nothing and gets the STORE_BUSY reply.

Every bad argument gets a reply that says what is allowed and changes nothing; an engine that is busy or
down gets "busy, try again in a moment", never a traceback.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import inspect
import json
import logging
import math
import random
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from bot.card import CardError, card_title, render_card
from bot.db import ChatSettings, Store, poem_keywords
from bot.settings import Settings
from engine.api import (
    DEFAULT_MODELS,
    DEFAULT_TEMPERATURE,
    MAX_BEAM_WIDTH,
    PoemEngine,
    PoemRequest,
    PoemResult,
)
from engine.errors import EngineUnavailableError, QueueFullError, RequestError
from engine.poem.forms import FORMS, parse_form
from engine.poem.meter import check_meter, format_report
from engine.poem.tunes import TUNES, parse_tune

log = logging.getLogger(__name__)

# A random opening for /poem without one: common characters every model knows.
OPENINGS = "春秋月花风雪山江云雨夜天"
MODE_NAMES = {"greedy": "贪心 greedy", "sample": "采样 sample", "beam": "束搜索 beam"}

BUSY = "诗人正忙，请稍后再试。\nBusy — please try again in a moment."
ADMINS_ONLY = "此命令仅限机器人管理员。\nThis command is for the bot's admins only."
STORE_BUSY = ("设置暂时无法保存，什么也没有改变，请稍后再试。\n"
              "The bot's database is busy; nothing was changed — please try again in a moment.")
CHAT_ADMINS_ONLY = "只有本群/频道的管理员可以更改设置和订阅。\nOnly this chat's administrators can change its settings and subscription."


@dataclass(frozen=True)
class Command:
    name: str
    usage: str  # the arguments, as shown in /help
    zh: str  # one line of help in Chinese
    en: str  # … and in English
    admin: bool = False  # ADMIN_IDS only
    manages: bool = False  # changes the chat's settings: in groups and channels, chat admins only
    manages_with_args: bool = False  # … only when given arguments (`/daily` shows, `/daily 08:00` changes)
    example: str = ""  # shown in docs/BOT.md


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("start", "", "开始，简介", "start: what this bot does"),
    Command("help", "", "所有命令", "all commands"),
    Command("poem", "[开头 关键词…]", "写一首诗，以第一个词开头，其余的词（至多 4 个，各 1–2 字）写进诗中；不给则随机开头",
            "a poem opening with the first word; further words are keywords (up to 4, 1–2 characters each) placed "
            "somewhere in it (random opening without)", example="/poem 月 舟 秋"),
    Command("ci", "词牌 [开头 关键词…]", "按词牌填词，可给开头和关键词（词牌见 /tunes）",
            "a 词 to a tune, with an optional opening and keywords (tunes: /tunes)", example="/ci 浣溪沙 月"),
    Command("tunes", "", "可填的词牌及其句式", "the tunes /ci writes, with their shape"),
    Command("acrostic", "春夏秋冬", "藏头诗：每句首字，4 或 8 个字", "acrostic: one character per line, 4 or 8",
            example="/acrostic 春夏秋冬"),
    Command("cangtou", "春夏秋冬", "同 /acrostic", "same as /acrostic", example="/cangtou 春夏秋冬"),
    Command("ciyun", "[开头] 原诗", "次韵：依原诗韵脚的次序作一首同体诗；也可回复一首诗发 /ciyun",
            "a poem on another's rhymes, in their order (次韵): give the poem, or reply to one with /ciyun",
            example="/ciyun 秋 床前明月光，疑是地上霜。举头望明月，低头思故乡。"),
    Command("form", "七绝|五绝|七律|五律", "诗体（也可用 qijue wujue qilv wulv）", "poem form (pinyin names too)",
            manages=True, example="/form 五律"),
    Command("greedy", "", "贪心解码：每次取最可能的几个字之一", "greedy decoding: among the likeliest few characters",
            manages=True),
    Command("sample", "[温度]", f"随机采样，温度 0–2（默认 {DEFAULT_TEMPERATURE}）",
            f"sampling, temperature in (0, 2] (default {DEFAULT_TEMPERATURE})",
            manages=True, example="/sample 1.2"),
    Command("beam", "N", "束搜索，宽度 1–16", "beam search, width 1–16", manages=True, example="/beam 5"),
    Command("model", "lstm-large|lstm|gru", "选择模型", "choose the model", manages=True, example="/model gru"),
    Command("card", "on|off", "诗笺：诗以图片（竖排卡片）发送，开或关；不带参数查看", "poems as picture cards: on or off "
            "(none: show)", manages_with_args=True, example="/card on"),
    Command("check", "诗句", "格律检查：每字平仄、韵部、出律之处", "prosody check: each character's tone, the rhyme, any faults",
            example="/check 白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"),
    Command("settings", "", "查看本聊天的设置", "show this chat's settings"),
    Command("daily", "HH:MM [诗体|词牌] | off", "每日一诗（或一首词）：订阅、取消或查看",
            "daily poem (or 词 to a tune): subscribe, stop, or show", manages_with_args=True,
            example="/daily 08:00 浣溪沙"),
    Command("status", "", "（管理员）模型版本、队列、运行时间、统计", "(admins) model versions, queue, uptime, counts",
            admin=True),
    Command("reload", "", "（管理员）立即载入最新发布的模型", "(admins) load the newest published model now",
            admin=True),
    Command("retrain", "", "（管理员）请训练器重新训练并报告结果", "(admins) ask the trainer to retrain; reports the outcome",
            admin=True),
)}
POEM_COMMANDS = ("poem", "ci", "acrostic", "cangtou", "ciyun")  # the ones the per-user rate limit counts (and 🔁 🖼 taps)
FEEDBACK_PER_MINUTE = 20  # 👍/👎 taps per user
SEED_LIMIT = 2**63  # the engine takes seeds in [0, 2**63)
# NOTE: a 次韵 line must arrive at a given character; a wider beam finds lines that lead there (read in
# docs/BOT.md), so in beam mode /ciyun searches at least this wide.
CIYUN_BEAM_WIDTH = 16

NOT_ON_RECORD = "这首诗已不在记录中。/ That poem is no longer on record."
UNKNOWN_BUTTON = "无法识别的按钮。/ Unknown button."
NOT_IN_CHANNELS = "频道里不能用这个按钮。/ Not available in channels."
# Callback data of the buttons under a poem: fb:<id>:up|down (👍/👎), again:<id> (🔁), card:<id> (🖼).
TAP_DATA = re.compile(r"(fb):([0-9]{1,19}):(up|down)|(again|card):([0-9]{1,19})")


@dataclass
class Reply:
    text: str  # a photo's caption when `photo` is set
    poem_id: int | None = None  # a stored poem: the transport shows its buttons (👍 👎, and 🔁 🖼 unless a channel)
    photo: bytes | None = None  # the poem's card (PNG), for chats with /card on
    actions: bool = True  # 🔁 and 🖼 under the poem; not in channels, where every subscriber could tap them


@dataclass
class Tap:
    """What a tap on a poem's button gets. `answer` is shown to the tapper (answerCallbackQuery); a refused
    tap (malformed data, another chat's poem, rate-limited) changes nothing and has nothing more to do."""

    answer: str
    refused: bool = False
    counts: tuple[int, int] | None = None  # 👍/👎: the poem's new counts, for its buttons
    poem_id: int | None = None  # the poem tapped, when it is one of this chat's
    then: Callable[[], Awaitable[Reply]] | None = None  # 🔁/🖼: makes the message to send, after answering


@dataclass
class Who:
    """Who sent a message, and where."""

    chat_id: int
    user_id: int | None  # None for channel posts (they come from the channel, not a user)
    chat_type: str = "private"  # private | group | supergroup | channel
    # Asks Telegram whether the sender administers this group; only called when a command needs it.
    is_chat_admin: Callable[[], Awaitable[bool]] | None = None
    # The chat the message was sent as: an anonymous group admin (the group) or "send as channel" (the channel).
    sender_chat_id: int | None = None
    replied: str | None = None  # the text (or caption) of the message this one replies to

    @property
    def rate_key(self) -> int:
        """Whose poems the rate limit counts. A message sent as a chat names a placeholder bot as its user,
        shared by every anonymous admin and every channel in Telegram, so it counts against that chat."""
        if self.sender_chat_id is not None:
            return self.sender_chat_id
        return self.user_id if self.user_id is not None else self.chat_id

    async def can_manage(self) -> bool:
        """May this sender change the chat's settings? Anyone in private; in channels only admins can post."""
        if self.chat_type in ("private", "channel"):
            return True
        return bool(self.is_chat_admin and await self.is_chat_admin())


class PoemUnavailable(Exception):
    """No poem this time; `reply` says why in words fit for the chat."""

    def __init__(self, reply: str, busy: bool = False):
        super().__init__(reply)
        self.reply, self.busy = reply, busy


class RateLimiter:
    """At most `count` events per `seconds` per key (a sliding window)."""

    def __init__(self, count: int, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.count, self.seconds, self.clock = count, seconds, clock
        self._events: dict[Any, collections.deque] = {}

    def acquire(self, key) -> float:
        """0 and the event is counted, or the seconds to wait before the next one is allowed."""
        now = self.clock()
        events = self._events.setdefault(key, collections.deque())
        while events and events[0] <= now - self.seconds:
            events.popleft()
        if len(events) >= self.count:
            return events[0] + self.seconds - now
        events.append(now)
        if len(self._events) > 10_000:  # forget idle users so memory stays bounded
            self._events = {k: v for k, v in self._events.items() if v and v[-1] > now - self.seconds}
        return 0.0


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Commands:
    """The bot's behaviour, shared by every transport."""

    def __init__(self, engine: PoemEngine, store: Store, settings: Settings, *,
                 retrain: Callable[[], Any] | None = None,
                 on_subscription_change: Callable[[int], Any] | None = None,
                 clock: Callable[[], dt.datetime] = utc_now,
                 rate_limiter: RateLimiter | None = None,
                 rng: random.Random | None = None):
        self.engine, self.store, self.settings = engine, store, settings
        self.admin_ids = set(settings.admin_ids)
        self.retrain = retrain  # the trainer's hook: () -> outcome (str or dict), sync or async
        self.on_subscription_change = on_subscription_change  # the scheduler's hook: (chat_id) -> None
        self.clock = clock  # aware datetimes; tests pass a fake
        self.rate_limiter = rate_limiter or RateLimiter(settings.rate_limit_count, settings.rate_limit_seconds)
        self.rng = rng or random.Random()
        # 👍/👎 taps cost nothing to send; bound the writes one user can cause.
        self.feedback_limiter = RateLimiter(FEEDBACK_PER_MINUTE, 60.0)
        self.started_at = clock()
        # Every command of COMMANDS and the method that answers it.
        self.handlers: dict[str, Callable[[Who, list[str]], Awaitable[Reply]]] = {
            "start": self.cmd_start, "help": self.cmd_help,
            "poem": self.cmd_poem, "ci": self.cmd_ci, "tunes": self.cmd_tunes,
            "acrostic": self.cmd_acrostic, "cangtou": self.cmd_acrostic, "ciyun": self.cmd_ciyun,
            "form": self.cmd_form, "greedy": self.cmd_greedy, "sample": self.cmd_sample, "beam": self.cmd_beam,
            "model": self.cmd_model, "card": self.cmd_card, "check": self.cmd_check, "settings": self.cmd_settings,
            "daily": self.cmd_daily,
            "status": self.cmd_status, "reload": self.cmd_reload, "retrain": self.cmd_retrain,
        }

    # entry points

    async def handle(self, who: Who, text: str) -> Reply | None:
        """A message's text: a /command, or (in private chats) plain text meaning /poem. None = not for us."""
        text = (text or "").strip()
        if text.startswith("/"):
            head, *args = text.split()
            name = head[1:].split("@", 1)[0].lower()
            return await self.run(who, name, args)
        if who.chat_type == "private" and text:
            return await self.run(who, "poem", text.split())
        return None

    async def run(self, who: Who, name: str, args: list[str]) -> Reply:
        """Run one command by name with its arguments."""
        command = COMMANDS.get(name)
        if command is None:
            name = _echo(name)
            return Reply(f"未知命令 /{name}。发送 /help 查看全部命令。\nUnknown command /{name}; send /help for the list.")
        if command.admin and who.user_id not in self.admin_ids:
            return Reply(ADMINS_ONLY)
        manages = command.manages or (command.manages_with_args and bool(args))
        if manages and not await who.can_manage():
            return Reply(CHAT_ADMINS_ONLY)
        if name in POEM_COMMANDS:
            wait = self.rate_limiter.acquire(who.rate_key)
            if wait > 0:
                return Reply(self.too_many(wait))
        try:
            return await self.handlers[name](who, args)
        except sqlite3.OperationalError as e:
            # Locked by another writer past the busy timeout, or the disk is full: the write rolled back,
            # nothing changed; say so instead of failing the update.
            log.warning("store unavailable for /%s in chat %s: %s", name, who.chat_id, e)
            return Reply(STORE_BUSY)

    def too_many(self, wait: float) -> str:
        return (f"请慢一点：{math.ceil(wait)} 秒后再来。\nToo many poems — try again in {math.ceil(wait)} s (at most "
                f"{self.rate_limiter.count} per {self.rate_limiter.seconds:g} s).")

    def describe_error(self, e: BaseException) -> str:
        """An exception for an admin's chat: the log filter does not see replies, so secrets go here too
        (an error from a hook or a library may carry a URL with the bot token in it)."""
        text = f"{type(e).__name__}: {e}"
        for secret in self.settings.secrets():
            text = text.replace(secret, "***")
        return text[:1000]

    # the buttons under a poem

    async def tap(self, who: Who, data: str | None) -> Tap:
        """A tap on a button under a poem, by its callback data. Callback data comes from the client and can
        be forged: it must name one of this chat's own poems, in a form the bot makes; 🔁 and 🖼 cost a
        token of the poem rate limit, 👍/👎 one of FEEDBACK_PER_MINUTE. Anything else is refused, changing
        nothing."""
        try:
            return await self._tap(who, data)
        except sqlite3.OperationalError as e:  # a locked database: the tap is answered, nothing posted
            log.warning("button tap in chat %s: the database is busy (%s)", who.chat_id, e)
            return Tap(STORE_BUSY.replace("\n", " / "), refused=True)

    async def _tap(self, who: Who, data: str | None) -> Tap:
        m = TAP_DATA.fullmatch(data or "")
        if m is None:
            return Tap(UNKNOWN_BUTTON, refused=True)
        if m.group(1):
            return await self.feedback(who, int(m.group(2)), 1 if m.group(3) == "up" else -1)
        kind, poem = m.group(4), await self.own_poem(who, int(m.group(5)))
        if poem is None:
            return Tap(NOT_ON_RECORD, refused=True)
        if who.chat_type == "channel":
            return Tap(NOT_IN_CHANNELS, refused=True)
        wait = self.rate_limiter.acquire(who.rate_key)
        if wait > 0:
            return Tap(self.too_many(wait).replace("\n", " / "), refused=True)
        if kind == "again":
            return Tap("再写一首… / Writing another…", then=lambda: self._unless_busy(who, self.again(who, poem)),
                       poem_id=poem["id"])
        return Tap("正在画诗笺… / Drawing the card…", then=lambda: self._unless_busy(who, self.stored_card(poem)),
                   poem_id=poem["id"])

    async def _unless_busy(self, who: Who, work: Awaitable[Reply]) -> Reply:
        """A tapped button's work, done after the tap was answered: a locked database gets the STORE_BUSY
        reply, as a command does, instead of failing after "Writing another…" with nothing to follow."""
        try:
            return await work
        except sqlite3.OperationalError as e:
            log.warning("button in chat %s: the database is busy (%s)", who.chat_id, e)
            return Reply(STORE_BUSY)

    async def own_poem(self, who: Who, poem_id: int) -> dict | None:
        """The stored poem `poem_id` if it was sent to this chat, else None (an id SQLite cannot hold is no
        poem of ours)."""
        poem = await self.store.aio.poem(poem_id) if 0 < poem_id < 2**63 else None
        return poem if poem is not None and poem["chat_id"] == who.chat_id else None

    async def feedback(self, who: Who, poem_id: int, value: int) -> Tap:
        """A 👍 (1) or 👎 (-1) on one of this chat's poems; the answer and the new counts."""
        if who.user_id is None or await self.own_poem(who, poem_id) is None:
            return Tap(NOT_ON_RECORD, refused=True)
        wait = self.feedback_limiter.acquire(who.user_id)
        if wait > 0:
            return Tap(f"请慢一点。/ Too many taps — try again in {math.ceil(wait)} s.", refused=True)
        await self.store.aio.record_feedback(poem_id, who.user_id, value)
        return Tap("谢谢！/ Thanks!" if value > 0 else "收到，我会改进。/ Noted.",
                   counts=await self.store.aio.feedback_counts(poem_id), poem_id=poem_id)

    async def again(self, who: Who, poem: dict) -> Reply:
        """🔁: another poem with the stored poem's settings (form, decoding, model, opening, keywords,
        acrostic, rhymes) and a new seed; a seed that happens to write the same poem again is tried once more."""
        settings = await self.poem_settings(poem)
        keywords = poem_keywords(poem)
        for _ in range(2):
            try:
                result = await self.generate(who.chat_id, prompt=poem["prompt"] or "", acrostic=poem["acrostic"],
                                             form=poem["form"], tune=poem.get("tune"), keywords=keywords,
                                             rhymes=poem.get("rhymes"), settings=settings,
                                             seed=self.rng.randrange(SEED_LIMIT))
            except PoemUnavailable as e:
                return Reply(e.reply)
            if result.poem != poem["poem"]:
                break
        return await self.sent_poem(who.chat_id, who.chat_type, who.user_id, "again", result, settings,
                                    prompt=poem["prompt"] or "", acrostic=poem["acrostic"], keywords=keywords,
                                    rhymes=poem.get("rhymes"))

    async def poem_settings(self, poem: dict) -> ChatSettings:
        """The settings a stored poem was written with; a poem stored before schema v3 has no beam width or
        temperature, and takes the chat's."""
        s = await self.store.aio.chat_settings(poem["chat_id"])
        return ChatSettings(form=poem["form"], mode=poem["mode"], model=poem["model"],
                            beam_width=poem["beam_width"] or s.beam_width,
                            temperature=poem["temperature"] or s.temperature)

    async def stored_card(self, poem: dict) -> Reply:
        """🖼: the card of a stored poem, with its text as the caption."""
        result = stored_result(poem)
        text = format_reply(result, await self.poem_settings(poem))
        png = await self.card_png(result, poem["prompt"] or "", poem_keywords(poem), poem["acrostic"],
                                  poem.get("rhymes"))
        if png is None:
            return Reply("卡片画不出来，请稍后再试。\nCould not draw the card; please try again later.")
        return Reply(text, photo=png)

    # poems

    async def cmd_poem(self, who: Who, args: list[str]) -> Reply:
        # "/poem 月 舟 秋": the first word opens the poem, the others are keywords placed anywhere in it; the
        # engine's validation says what is wrong with them (too many, too long, no room).
        prompt = args[0] if args else self.rng.choice(OPENINGS)
        return await self.poem_reply(who, prompt=prompt, keywords=args[1:])

    async def cmd_ci(self, who: Who, args: list[str]) -> Reply:
        # "/ci 浣溪沙 月 舟": the tune, then the opening and keywords as for /poem.
        if not args:
            return Reply(CI_USAGE)
        try:
            tune = parse_tune(args[0])
        except ValueError:
            return Reply(f"没有这个词牌：{_echo(args[0])}。发送 /tunes 查看可填的词牌。\n"
                         f"Unknown tune {_echo(args[0])!r}; /tunes lists them.")
        prompt = args[1] if len(args) > 1 else self.rng.choice(OPENINGS)
        return await self.poem_reply(who, prompt=prompt, keywords=args[2:], form="ci", tune=tune.name)

    async def cmd_tunes(self, who: Who, args: list[str]) -> Reply:
        return Reply(tunes_text())

    async def cmd_acrostic(self, who: Who, args: list[str]) -> Reply:
        heads = "".join(args)
        # Keep the chat's line length; the number of characters picks 绝句 (4 lines) or 律诗 (8 lines). Any
        # other count goes to the engine's validation as it is, which says what an acrostic needs.
        chat_form = FORMS[(await self.store.aio.chat_settings(who.chat_id)).form]
        form = next((f.name for f in FORMS.values() if f.line_len == chat_form.line_len and f.num_lines == len(heads)),
                    chat_form.name)
        return await self.poem_reply(who, acrostic=heads, form=form)

    async def cmd_ciyun(self, who: Who, args: list[str]) -> Reply:
        # "/ciyun [开头] 原诗", or "/ciyun [开头]" in reply to the message that holds the poem. The poem's form
        # and rhyme characters come from reading its meter, as /check does.
        opening, poem = ciyun_arguments(args, who.replied)
        if not poem:
            return Reply(CIYUN_USAGE)
        try:
            report = check_meter(poem)
        except RequestError as e:
            return Reply(f"{CIYUN_USAGE}\n({_echo(e.message, 200)})")
        return await self.poem_reply(who, prompt=opening, form=report.form.name, rhymes="".join(report.rhyme_chars))

    async def poem_reply(self, who: Who, *, prompt: str = "", acrostic: str | None = None,
                         form: str | None = None, keywords: list[str] | None = None, tune: str | None = None,
                         rhymes: str | None = None) -> Reply:
        s = await self.store.aio.chat_settings(who.chat_id)
        if rhymes and s.mode == "beam":
            s = replace(s, beam_width=max(s.beam_width, CIYUN_BEAM_WIDTH))
        try:
            result = await self.generate(who.chat_id, prompt=prompt, acrostic=acrostic, form=form, keywords=keywords,
                                         settings=s, tune=tune, rhymes=rhymes)
        except PoemUnavailable as e:
            return Reply(e.reply)
        return await self.sent_poem(who.chat_id, who.chat_type, who.user_id, "command", result, s, prompt=prompt,
                                    acrostic=acrostic, keywords=keywords or [], rhymes=rhymes)

    async def sent_poem(self, chat_id: int, chat_type: str | None, user_id: int | None, source: str,
                        result: PoemResult, s: ChatSettings, *, prompt: str = "", acrostic: str | None = None,
                        keywords=(), rhymes: str | None = None) -> Reply:
        """Record a poem about to be sent and make its message: the text, and the card when the chat has
        cards on (`cards_on`); a card that cannot be drawn leaves the text alone."""
        poem_id = await self.store.aio.record_poem(chat_id, user_id, source, result, prompt, acrostic,
                                                   keywords=keywords, beam_width=s.beam_width,
                                                   temperature=s.temperature, rhymes=rhymes)
        png = None
        if cards_on(await self.store.aio.chat_settings(chat_id), chat_type):
            png = await self.card_png(result, prompt, keywords, acrostic, rhymes)
        return Reply(format_reply(result, s), poem_id=poem_id, photo=png, actions=chat_type != "channel")

    async def card_png(self, result: PoemResult, prompt: str = "", keywords=(), acrostic: str | None = None,
                       rhymes: str | None = None) -> bytes | None:
        """The poem's card (PNG), drawn on a worker thread (a tenth of a second or so of CPU); None if it
        cannot be drawn (logged)."""
        title = poem_card_title(result.form, getattr(result, "tune", None), prompt, keywords, acrostic, rhymes)
        model = result.model or {}
        try:
            card = await asyncio.to_thread(render_card, result.poem, title, model=model.get("name") or "",
                                           version=model.get("version") or "")
        except (CardError, OSError) as e:
            log.warning("no card for a %s poem: %s", result.form, e)
            return None
        if card.missing:
            log.info("card drawn without a font for %s", "".join(card.missing))
        return card.png

    async def generate(self, chat_id: int, *, prompt: str = "", acrostic: str | None = None,
                       form: str | None = None, seed: int | None = None,
                       keywords: list[str] | None = None, settings: ChatSettings | None = None,
                       tune: str | None = None, rhymes: str | None = None) -> PoemResult:
        """One poem in the chat's settings (or `settings`); raises PoemUnavailable with a reply fit for the
        chat. `seed`: the engine's draw (same request and seed, same poem); None lets the engine pick one.
        A 词 (`tune`) goes to the engine's model that writes 词, whatever the chat's /model."""
        s = settings or await self.store.aio.chat_settings(chat_id)
        if tune:
            form = "ci"
        request = PoemRequest(prompt=prompt, acrostic=acrostic, form=form or s.form, mode=s.mode,
                              beam_width=s.beam_width, temperature=s.temperature,
                              model=None if tune else s.model, seed=seed, keywords=list(keywords or []), tune=tune,
                              rhymes=rhymes or None)
        try:
            return await self.engine.generate(request.validate())
        except RequestError as e:
            raise PoemUnavailable(describe_request_error(e)) from None
        except QueueFullError:
            raise PoemUnavailable(BUSY, busy=True) from None
        except (EngineUnavailableError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            # OSError covers refused connections; asyncio.TimeoutError is TimeoutError on 3.11.
            log.warning("engine unavailable: %s: %s", type(e).__name__, e)
            raise PoemUnavailable(BUSY, busy=True) from None

    async def cmd_check(self, who: Who, args: list[str]) -> Reply:
        return Reply(check_reply(" ".join(args)))

    # settings

    async def cmd_form(self, who: Who, args: list[str]) -> Reply:
        allowed = "、".join(f"{f.chinese} {f.name}" for f in FORMS.values())
        if len(args) != 1:
            return Reply(f"用法：/form 七绝（可选：{allowed}）\nUsage: /form qijue — one of {allowed}.")
        try:
            form = parse_form(args[0])
        except ValueError:
            return Reply(f"没有这种诗体：{_echo(args[0])}。可选：{allowed}\nUnknown form {_echo(args[0])!r}; allowed: {allowed}.")
        await self.store.aio.update_chat_settings(who.chat_id, form=form.name)
        return Reply(f"诗体：{form.chinese}（{form.num_lines} 句 × {form.line_len} 字）\n"
                     f"Form: {form.name} ({form.num_lines} lines × {form.line_len} characters).")

    async def cmd_greedy(self, who: Who, args: list[str]) -> Reply:
        if args:
            return Reply("/greedy 不带参数。\n/greedy takes no arguments.")
        await self.store.aio.update_chat_settings(who.chat_id, mode="greedy")
        return Reply("解码：贪心（每次取最可能的几个字之一，每首各不相同）。\n"
                     "Decoding: greedy (each character among the likeliest few, so poems still differ).")

    async def cmd_sample(self, who: Who, args: list[str]) -> Reply:
        usage = f"用法：/sample 或 /sample {DEFAULT_TEMPERATURE}（温度，大于 0 且不超过 2）\nUsage: /sample [temperature], temperature in (0, 2]."
        if len(args) > 1:
            return Reply(usage)
        temperature = (await self.store.aio.chat_settings(who.chat_id)).temperature
        if args:
            try:
                temperature = float(args[0])
            except ValueError:
                return Reply(usage)
            if not (math.isfinite(temperature) and 0 < temperature <= 2):
                return Reply(usage)
        await self.store.aio.update_chat_settings(who.chat_id, mode="sample", temperature=temperature)
        return Reply(f"解码：随机采样，温度 {temperature:g}。\nDecoding: sampling at temperature {temperature:g}.")

    async def cmd_beam(self, who: Who, args: list[str]) -> Reply:
        usage = f"用法：/beam N（N 为 1–{MAX_BEAM_WIDTH} 的整数）\nUsage: /beam N, a whole number from 1 to {MAX_BEAM_WIDTH}."
        if len(args) != 1 or not re.fullmatch(r"\d{1,3}", args[0]) or not 1 <= int(args[0]) <= MAX_BEAM_WIDTH:
            return Reply(usage)
        width = int(args[0])
        await self.store.aio.update_chat_settings(who.chat_id, mode="beam", beam_width=width)
        return Reply(f"解码：束搜索，宽度 {width}。\nDecoding: beam search, width {width}.")

    async def cmd_model(self, who: Who, args: list[str]) -> Reply:
        models = await self.engine_models()
        if not models:
            # NOTE: without the engine's list a name cannot be checked: a 词-only model, or one the operator
            # does not serve, would be stored and then write every 诗 of the chat.
            return Reply(BUSY)
        ci_only = {m["name"] for m in models if not m.get("writes_shi", True)}
        names = [m["name"] for m in models if m["name"] not in ci_only]
        usage = f"用法：/model {'|'.join(names)}\nUsage: /model {'|'.join(names)}."
        if len(args) != 1:
            return Reply(usage)
        name = args[0].lower()
        if name in ci_only:
            return Reply(f"{name} 只填词：请用 /ci 词牌。写诗可选：{', '.join(names)}\n"
                         f"{name} writes 词 only: use /ci TUNE. For 诗 choose: {', '.join(names)}.")
        if name not in names:
            return Reply(f"没有这个模型：{_echo(args[0])}。可选：{', '.join(names)}\nUnknown model {_echo(args[0])!r}; "
                         f"loaded: {', '.join(names)}.")
        await self.store.aio.update_chat_settings(who.chat_id, model=name)
        return Reply(f"模型：{name}\nModel: {name}.")

    async def cmd_card(self, who: Who, args: list[str]) -> Reply:
        s = await self.store.aio.chat_settings(who.chat_id)
        if not args:
            return Reply(describe_cards(s, who.chat_type))
        choice = {"on": True, "开": True, "off": False, "关": False}.get(args[0].lower()) if len(args) == 1 else None
        if choice is None:
            return Reply("用法：/card on 或 /card off（诗以图片发送，或以文字）\n"
                         "Usage: /card on or /card off — poems as picture cards, or as text.")
        s = await self.store.aio.update_chat_settings(who.chat_id, card=choice)
        return Reply(describe_cards(s, who.chat_type))

    async def engine_models(self) -> list[dict] | None:
        """The engine's loaded models (GET /v1/models entries), or None when it cannot be asked right now."""
        try:
            return await self.engine.models()
        except Exception as e:  # noqa: BLE001 — any failure here just means "cannot tell"
            log.warning("could not list models: %s: %s", type(e).__name__, e)
            return None

    async def writes_ci(self) -> bool:
        """Whether a model the engine serves writes 词 (an engine that cannot be asked now: assume so, and
        let the post say otherwise)."""
        models = await self.engine_models()
        return models is None or any(m.get("writes_ci") for m in models)

    async def cmd_settings(self, who: Who, args: list[str]) -> Reply:
        s = await self.store.aio.chat_settings(who.chat_id)
        return Reply(f"{describe_settings(s, who.chat_type)}\n{await self.describe_subscription(who.chat_id)}")

    # daily posts

    async def cmd_daily(self, who: Who, args: list[str]) -> Reply:
        if not args:
            return Reply(await self.describe_subscription(who.chat_id))
        usage = ("用法：/daily 08:00 [诗体|词牌]，/daily off 取消，/daily 查看\n"
                 "Usage: /daily HH:MM [form|tune] to subscribe, /daily off to stop, /daily to show.")
        if args[0].lower() in ("off", "stop", "关", "取消") and len(args) == 1:
            removed = await self.store.aio.unsubscribe(who.chat_id)
            await self._subscription_changed(who.chat_id)
            return Reply("已取消每日一诗。\nDaily poem stopped." if removed else "本聊天没有订阅。\nThis chat has no subscription.")
        m = re.fullmatch(r"([01]?\d|2[0-3])[:：]([0-5]\d)", args[0])
        if not m or len(args) > 2:
            return Reply(usage)
        form = tune = None
        if len(args) == 2:
            try:
                form = parse_form(args[1]).name
            except ValueError:
                try:
                    form, tune = "ci", parse_tune(args[1]).name
                    if not await self.writes_ci():
                        return Reply(NO_CI)
                except ValueError:
                    allowed = "、".join(f"{f.chinese} {f.name}" for f in FORMS.values())
                    return Reply(f"没有这种诗体或词牌：{_echo(args[1])}。可选：{allowed}，或 /tunes 中的词牌\n"
                                 f"Unknown form or tune {_echo(args[1])!r}; allowed: {allowed}, or a tune of /tunes.")
        hhmm = f"{int(m.group(1)):02d}:{int(m.group(2)):02d}"  # int() also normalises full-width digits
        await self.store.aio.subscribe(who.chat_id, hhmm, form, since=self.clock(), chat_type=who.chat_type,
                                       tune=tune)
        await self._subscription_changed(who.chat_id)
        return Reply(await self.describe_subscription(who.chat_id))

    async def _subscription_changed(self, chat_id: int) -> None:
        if self.on_subscription_change is not None:
            await maybe_await(self.on_subscription_change(chat_id))

    async def describe_subscription(self, chat_id: int) -> str:
        sub = await self.store.aio.subscription(chat_id)
        tz = self.settings.timezone.key
        if sub is None:
            return "每日一诗：未订阅（/daily 08:00）\nDaily poem: off (/daily 08:00 to subscribe)."
        form = FORMS.get(sub.form) if sub.form else None
        what_zh = f"一首{sub.tune}" if sub.tune else f"一首{form.chinese}" if form else "一首诗"
        what_en = (f"a 词 to {sub.tune}" if sub.tune else f"a {form.name}" if form else "a poem in this chat's form")
        if sub.paused:
            # The command that resumes it as it was: with its form or tune, which /daily HH:MM alone would drop.
            resume = f"/daily {sub.time}" + (f" {sub.tune}" if sub.tune else f" {form.chinese}" if form else "")
            return (f"每日一诗：已暂停（{sub.paused_reason or '无法发送'}）；发送 {resume} 恢复。\n"
                    f"Daily poem: paused ({sub.paused_reason or 'could not send'}); {resume} resumes it.")
        return f"每日一诗：每天 {sub.time}（{tz}）{what_zh}。\nDaily poem: {what_en} every day at {sub.time} ({tz})."

    # help

    async def cmd_start(self, who: Who, args: list[str]) -> Reply:
        return Reply("吟诗：用字符级循环神经网络写古诗。试试 /poem 月，或直接发几个字。发送 /help 查看全部命令。\n"
                     "Yinshi writes classical Chinese poems with a character RNN. Try /poem 月, or just send "
                     "a few characters. /help lists every command.")

    async def cmd_help(self, who: Who, args: list[str]) -> Reply:
        return Reply(help_text())

    # admin

    async def cmd_status(self, who: Who, args: list[str]) -> Reply:
        try:
            engine_status = await self.engine.status()
        except Exception as e:  # noqa: BLE001 — /status must answer even when the engine is down
            engine_status = {"error": self.describe_error(e)}
        uptime = self.clock() - self.started_at
        lines = ["引擎 / engine:"] + [f"  {k}: {_compact(v)}" for k, v in engine_status.items()]
        lines.append(f"机器人运行 / bot uptime: {str(uptime).split('.')[0]}")
        lines += [f"  {k}: {v}" for k, v in (await self.store.aio.counts()).items()]
        return Reply("\n".join(lines))

    async def cmd_reload(self, who: Who, args: list[str]) -> Reply:
        try:
            outcome = await self.engine.reload()
        except Exception as e:  # noqa: BLE001 — report any failure to the admin instead of raising
            return Reply(f"重新载入失败 / reload failed: {self.describe_error(e)}")
        return Reply("重新载入 / reload:\n" + "\n".join(f"  {k}: {_compact(v)}" for k, v in outcome.items()))

    async def cmd_retrain(self, who: Who, args: list[str]) -> Reply:
        if self.retrain is None:
            return Reply("未配置重新训练。\nRetraining is not configured.")
        try:
            # A plain function may train for minutes: run it in a thread so other chats are still served.
            if inspect.iscoroutinefunction(self.retrain):
                outcome = await self.retrain()
            else:
                outcome = await maybe_await(await asyncio.to_thread(self.retrain))
        except Exception as e:  # noqa: BLE001 — report any failure to the admin instead of raising
            log.exception("retrain failed")
            return Reply(f"重新训练失败 / retrain failed: {self.describe_error(e)}")
        return Reply(f"重新训练完成 / retrain finished:\n{_compact(outcome) if outcome is not None else 'ok'}")


ACROSTIC_USAGE = "藏头诗需要 4 或 8 个汉字，每句一个：/acrostic 春夏秋冬\nAn acrostic needs 4 or 8 Han characters, one per line."


def describe_request_error(e: RequestError) -> str:
    """The engine's validation error, in words for the chat (the engine validates; the bot explains)."""
    if e.code == "unknown_character":
        return f"模型不认识这个字，换一个试试。\nThe model does not know that character: {_echo(e.message, 200)}"
    if e.field == "acrostic":
        return f"{ACROSTIC_USAGE}\n({_echo(e.message, 200)})"
    if e.field == "rhymes":
        return f"无法这样次韵。\nCannot answer with those rhymes: {_echo(e.message, 200)}"
    if e.code == "prompt_too_long":
        return f"开头太长。\nThe opening is too long: {_echo(e.message, 200)}"
    if e.code == "no_ci":
        return NO_CI
    if e.code == "bad_character":
        return f"开头只能是汉字。\nThe opening must be Han characters: {_echo(e.message, 200)}"
    return f"无法作诗。\nCannot write that poem: {_echo(e.message, 200)}"


CIYUN_USAGE = ("用法：/ciyun [开头] 原诗（一首绝句或律诗），或回复一首诗发 /ciyun [开头]，"
               "如 /ciyun 秋 床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"
               "Usage: /ciyun [opening] <a 绝句 or 律诗>, or reply to a poem with /ciyun [opening]: a poem of the "
               "same form on its rhymes, in their order.")


def ciyun_arguments(args: list[str], replied: str | None) -> tuple[str, str]:
    """/ciyun's (opening, poem). The poem is in the arguments, after an opening of one or two characters if
    there is one; or, when the arguments hold no poem, in the message replied to (`poem_in`), the arguments
    then being the opening."""
    if len(args) > 1 and len(args[0]) <= 2 and _is_poem(" ".join(args[1:])):
        return args[0], " ".join(args[1:])
    if replied is not None and not _is_poem(" ".join(args)):
        return "".join(args), poem_in(replied)
    return "", " ".join(args)


def poem_in(text: str, max_blocks: int = 12) -> str:
    """The poem in a message: the longest run of its blank-line-separated blocks that reads as a 绝句 or 律诗,
    the earliest first (a poem the bot sent is followed by a footer; a pasted one may follow a title, or put a
    blank line between its couplets); else its first block, whose error /ciyun then explains."""
    blocks = [b for b in re.split(r"\n\s*\n", text.strip()) if b.strip()][:max_blocks]
    for start in range(len(blocks)):
        for end in range(len(blocks), start, -1):
            candidate = "\n".join(blocks[start:end])
            if _is_poem(candidate):
                return candidate
    return blocks[0] if blocks else ""


def _is_poem(text: str) -> bool:
    try:
        check_meter(text)
    except RequestError:
        return False
    return True


CHECK_USAGE = ("用法：/check 后接一首绝句或律诗（4 或 8 句，每句 5 或 7 字），如 /check 白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\n"
               "Usage: /check followed by a 绝句 or 律诗 (4 or 8 lines of 5 or 7 characters).")


def check_reply(text: str) -> str:
    """/check's reply: the poem marked ○ 平 ● 仄 ◐ 中 and its verdict (engine.poem.meter, no engine call), or
    the usage and what was wrong with the text."""
    if not text.strip():
        return CHECK_USAGE
    try:
        return format_report(check_meter(text))
    except RequestError as e:
        return f"{CHECK_USAGE}\n({_echo(e.message, 200)})"


def cards_on(s: ChatSettings, chat_type: str | None) -> bool:
    """Poems go out as picture cards: the chat's /card setting, else on in channels only (a channel's daily
    poem is a picture with its text as the caption)."""
    return s.card if s.card is not None else chat_type == "channel"


def describe_cards(s: ChatSettings, chat_type: str | None) -> str:
    default = "" if s.card is not None else "（默认）"
    default_en = "" if s.card is not None else " (the default here)"
    if cards_on(s, chat_type):
        return (f"诗笺：开{default}，诗以竖排图片发送，文字在图片说明中；/card off 关闭。\n"
                f"Cards: on{default_en} — poems come as pictures, the text as caption; /card off for text.")
    return (f"诗笺：关{default}，诗以文字发送；诗下的 🖼 按钮可单独作图；/card on 开启。\n"
            f"Cards: off{default_en} — poems come as text (🖼 under a poem draws its card); /card on for pictures.")


def describe_settings(s: ChatSettings, chat_type: str | None = None) -> str:
    form = FORMS[s.form]
    mode = {"greedy": "greedy", "sample": f"sample, temperature {s.temperature:g}",
            "beam": f"beam, width {s.beam_width}"}[s.mode]
    return (f"诗体 form: {form.chinese} {form.name}\n"
            f"解码 decoding: {mode}\n"
            f"模型 model: {s.model or 'default'}\n"
            f"诗笺 cards: {'on' if cards_on(s, chat_type) else 'off'}")


def poem_card_title(form: str, tune: str | None = None, prompt: str = "", keywords=(),
                    acrostic: str | None = None, rhymes: str | None = None) -> str:
    """A poem card's title: "七绝 · 月", "七绝 · 月 舟 秋", "五绝 · 藏头 春夏秋冬", "五绝 · 次韵 霜乡"; a 词 is
    titled by its tune, "词 · 水调歌头"."""
    if form == "ci" or tune:
        return card_title("词", tune or prompt)
    return card_title(FORMS[form].chinese if form in FORMS else form, prompt, keywords, acrostic, rhymes)


def stored_result(poem: dict) -> PoemResult:
    """A stored poem as the PoemResult it was sent from (for its caption and card)."""
    lines = [line for line in re.split(r"[，。？！；\n]", poem["poem"] or "") if line]
    return PoemResult(poem=poem["poem"] or "", lines=lines, form=poem["form"], mode=poem["mode"],
                      model={"name": poem["model"], "version": poem["model_version"]}, elapsed_ms=0.0,
                      tune=poem.get("tune"))


def format_reply(result: PoemResult, s: ChatSettings) -> str:
    """One couplet a line (a 词: one sentence a line, a blank line between its stanzas), then a footer
    naming form or tune, decoding and model."""
    mode = {"greedy": "greedy", "sample": f"sample t={s.temperature:g}", "beam": f"beam {s.beam_width}"}.get(
        result.mode, result.mode)
    model = (result.model or {}).get("name", "?")
    if result.form == "ci":
        stanzas = [re.sub(r"(?<=。)(?=.)", "\n", stanza) for stanza in result.poem.split("\n")]
        return "\n\n".join(stanzas) + f"\n\n— 词 · {result.tune} · {mode} · {model}"
    lines = result.lines
    couplets = [f"{lines[i]}，{lines[i + 1]}。" for i in range(0, len(lines) - 1, 2)]
    return "\n".join(couplets) + f"\n\n— {FORMS[result.form].chinese} · {mode} · {model}"


NO_CI = "这里还没有会填词的模型。\nNo model here writes 词 yet (the operator adds ci to ENGINE_MODELS)."
CI_USAGE = ("用法：/ci 词牌 [开头 关键词…]，如 /ci 浣溪沙 月；/tunes 查看词牌。\n"
            "Usage: /ci <tune> [opening keywords…], e.g. /ci 浣溪沙 月; /tunes lists the tunes.")


def tunes_text() -> str:
    """/tunes: each tune with its characters and lines per stanza, most common first."""
    items = [f"{t.name} {t.num_chars}字 {'+'.join(str(len(st)) for st in t.stanzas)}句" for t in TUNES.values()]
    return (f"词牌（{len(items)} 个，按《全宋词》中的常见程度）：\n" + "、".join(items) +
            "\n用 /ci 词牌 [开头] 填词，/daily 08:00 词牌 每日一首。\n"
            f"Tunes ({len(items)}, most common first): characters and lines per stanza. /ci <tune> [opening] "
            "writes one; /daily 08:00 <tune> posts one daily.")


def help_text() -> str:
    shown = COMMANDS.values()
    zh = "\n".join(f"/{c.name} {c.usage}".rstrip() + f" — {c.zh}" for c in shown)
    en = "\n".join(f"/{c.name} {c.usage}".rstrip() + f" — {c.en}" for c in shown)
    return (f"吟诗 · 命令\n{zh}\n私聊中直接发送汉字，等同 /poem。\n\n"
            f"Yinshi · commands\n{en}\nIn a private chat, plain text works like /poem.")


def _echo(text: str, limit: int = 24) -> str:
    """User input quoted back in a reply: short (Telegram refuses messages over 4096 characters) and
    encodable (a lone surrogate would make the send itself fail)."""
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.encode("utf-8", "replace").decode("utf-8")


def _compact(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


async def maybe_await(value):
    return await value if inspect.isawaitable(value) else value
