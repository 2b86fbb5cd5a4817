"""Property-based fuzzing of the bot's command parsing (bot.commands) against a real SQLite file (issue 7).

    .venv/bin/python -m pytest tests/test_fuzz_bot.py -q                  # bounded (CI)
    YINSHI_SOAK=1 .venv/bin/python -m pytest tests/test_fuzz_bot.py -q    # the long soak variants too

Any text — every code point including lone surrogates and odd spaces, any command, any arguments, up to
Telegram's 4096 characters — from anyone in any kind of chat gets a reply Telegram will take (non-empty,
valid UTF-8, at most 4096 characters) or, for plain text outside a private chat, none; never an
exception. A rejected command leaves every row of `chats` and `subscriptions` as it was (compared row by
row), and an accepted one changes exactly what it says.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, event, given, settings as hsettings, strategies as st

from bot.commands import ADMINS_ONLY, BUSY, CHAT_ADMINS_ONLY, COMMANDS, Commands, Who
from bot.db import Store
from bot_fixtures import ScriptedEngine, make_settings
from engine.api import MAX_BEAM_WIDTH
from engine.poem.forms import parse_form

SOAK = os.environ.get("YINSHI_SOAK") == "1"
FUZZ = dict(deadline=None, derandomize=not SOAK, suppress_health_check=list(HealthCheck))
MAX_MESSAGE = 4096  # Telegram refuses longer messages, incoming and outgoing
ADMIN, USER, CHAT_ADMIN = 999, 42, 7
MANAGING = [name for name, c in COMMANDS.items() if c.manages or c.manages_with_args]

ANY_CHAR = st.characters(codec=None, exclude_categories=())  # every code point, surrogates included
SPACES = st.sampled_from([" ", "  ", "\t", "\n", "\u3000", "\u00a0", "\u2028", "\u200b", "\x1c"])
WORDS = (st.text(ANY_CHAR, max_size=12)
         | st.sampled_from(["5", "16", "17", "0", "-3", "1e1", "0.8", "2", "2.0000001", "nan", "inf", "١٦", "５",
                            "七绝", "qijue", "五言律诗", "QILV", "lstm", "GRU", "transformer", "08:00", "8:00",
                            "23:59", "24:00", "０８：００", "off", "取消", "on", "ON", "开", "春夏秋冬", "月", "龘", "🌙", "\ud800"])
         | st.text(ANY_CHAR, min_size=200, max_size=4000))


@st.composite
def messages(draw):
    """What a user might type: a known or unknown /command (maybe @addressed), then arguments."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(ANY_CHAR, max_size=MAX_MESSAGE))
    name = draw(st.sampled_from(sorted(COMMANDS)) | st.text(ANY_CHAR, max_size=10))
    head = "/" + (name.upper() if draw(st.integers(0, 9)) == 0 else name)
    if draw(st.integers(0, 6)) == 0:
        head += "@" + draw(st.sampled_from(["yinshi_test_bot", "other_bot", ""]))
    parts = [head]
    for word in draw(st.lists(WORDS, max_size=4)):
        parts += [draw(SPACES), word]
    text = draw(SPACES | st.just("")) + "".join(parts) + draw(SPACES | st.just(""))
    return text[:MAX_MESSAGE]


def senders():
    return st.sampled_from([("private", USER), ("private", ADMIN), ("group", CHAT_ADMIN), ("group", USER),
                            ("supergroup", ADMIN), ("channel", None)])


def who_for(chat_type: str, user_id: int | None) -> Who:
    chat_id = {"private": user_id, "channel": -1003}.get(chat_type, -1002)

    async def is_chat_admin():
        return user_id == CHAT_ADMIN

    return Who(chat_id=chat_id, user_id=user_id, chat_type=chat_type, is_chat_admin=is_chat_admin)


def rows(store: Store) -> dict:
    """Every row of the tables a command may change (minus write timestamps)."""
    chats = [{k: v for k, v in r.items() if k != "updated_at"} for r in store.db["chats"].rows_where(order_by="chat_id")]
    subs = [{k: v for k, v in r.items() if k != "created_at"}
            for r in store.db["subscriptions"].rows_where(order_by="chat_id")]
    return {"chats": chats, "subscriptions": subs}


def expected_setting(name: str, args: list[str]) -> dict | None:
    """What an accepted setting command stores, from the documented rules alone; None = must be refused."""
    if name == "beam":
        ok = len(args) == 1 and re.fullmatch(r"\d{1,3}", args[0]) and 1 <= int(args[0]) <= MAX_BEAM_WIDTH
        return {"mode": "beam", "beam_width": int(args[0])} if ok else None
    if name == "greedy":
        return None if args else {"mode": "greedy"}
    if name == "sample":
        if not args:
            return {"mode": "sample"}
        try:
            t = float(args[0])
        except ValueError:
            return None
        return {"mode": "sample", "temperature": t} if len(args) == 1 and 0 < t <= 2 else None
    if name == "form":
        try:
            return {"form": parse_form(args[0]).name} if len(args) == 1 else None
        except ValueError:
            return None
    if name == "model":
        return {"model": args[0].lower()} if len(args) == 1 and args[0].lower() in ("lstm", "gru") else None
    if name == "card":
        choice = {"on": True, "开": True, "off": False, "关": False}.get(args[0].lower()) if len(args) == 1 else None
        return None if choice is None else {"card": choice}
    raise AssertionError(name)


@pytest.fixture
def bot(tmp_path):
    store = Store.open(tmp_path / "fuzz.db")  # a real file in WAL mode, as in production
    engine = ScriptedEngine()
    commands = Commands(engine, store, make_settings(tmp_path, rate_limit_count=10**9))
    yield commands, store, engine
    store.close()


async def _any_message_property(bot, text, sender):
    commands, store, engine = bot
    who = who_for(*sender)
    before, reloads = rows(store), engine.reloads
    reply = await commands.handle(who, text)
    after = rows(store)
    stripped = text.strip()
    if reply is None:
        event("no reply")
        assert not stripped or (who.chat_type != "private" and not stripped.startswith("/")), repr(text[:80])
        assert after == before
        return
    # A reply Telegram accepts: non-empty, encodable, within the length limit.
    assert reply.text.strip() and len(reply.text) <= MAX_MESSAGE, (text[:80], len(reply.text))
    reply.text.encode("utf-8")
    assert "Traceback" not in reply.text
    if not stripped.startswith("/"):
        event("plain text")
        assert after == before
        return
    head, *args = stripped.split()
    name = head[1:].split("@", 1)[0].lower()
    command = COMMANDS.get(name)
    event(f"/{name if command else '<unknown>'}")
    if command is None:
        assert "/help" in reply.text and after == before
        return
    if command.admin:
        assert engine.reloads == reloads or who.user_id == ADMIN
        if who.user_id != ADMIN:
            assert reply.text == ADMINS_ONLY
    manages = command.manages or (command.manages_with_args and bool(args))
    if manages and who.chat_type in ("group", "supergroup") and who.user_id != CHAT_ADMIN:
        assert reply.text == CHAT_ADMINS_ONLY and after == before
        return
    if not manages:
        # Poems, help, settings, status…: no setting or subscription may change.
        assert after == before
        return
    if name == "daily":
        if after != before:
            assert "Usage" not in reply.text and "Unknown" not in reply.text
        return
    want = expected_setting(name, args)
    if want is None:
        event("rejected setting")
        assert after == before, f"a refused {text[:60]!r} changed the store"
        return
    event("accepted setting")
    stored = {k: v for k, v in store.chat_settings(who.chat_id).__dict__.items() if k in want}
    assert stored == want, (text[:60], stored, want)


@hsettings(max_examples=1500, **FUZZ)
@given(text=messages(), sender=senders())
async def test_any_message_gets_a_sendable_reply_and_a_refused_command_changes_no_row(bot, text, sender):
    await _any_message_property(bot, text, sender)


@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="soak run: set YINSHI_SOAK=1")
@hsettings(max_examples=20000, **FUZZ)
@given(text=messages(), sender=senders())
async def test_soak_any_message(bot, text, sender):
    await _any_message_property(bot, text, sender)


@hsettings(max_examples=300, **FUZZ)
@given(poem_id=st.integers() | st.sampled_from([0, -1, 2**63 - 1, 2**63, 2**64, 10**30]),
       value=st.sampled_from([1, -1]), user=st.sampled_from([USER, ADMIN, None]))
async def test_feedback_for_any_poem_id_is_answered_and_never_raises(bot, poem_id, value, user):
    commands, store, _ = bot
    who = Who(chat_id=USER, user_id=user)
    tap = await commands.feedback(who, poem_id, value)
    assert tap.answer and tap.refused and tap.counts is None  # no such poem (the store holds none yet)
    assert store.counts()["likes"] == store.counts()["dislikes"] == 0


@pytest.mark.parametrize("text", [
    "/form " + "九" * 4000, "/model " + "x" * 4000, "/daily 08:00 " + "诗" * 4000, "/" + "命" * 4000,
    "/sample " + "9" * 4000, "/beam " + "1" * 4000, "/poem " + "🌙" * 2000, "/acrostic " + "春" * 4000,
])
async def test_a_long_argument_is_not_echoed_past_telegrams_limit(bot, text):
    commands, store, _ = bot
    reply = await commands.handle(who_for("private", USER), text)
    assert reply.text and len(reply.text) <= MAX_MESSAGE and rows(store) == {"chats": [], "subscriptions": []}


@pytest.mark.parametrize("text", ["/\ud800", "/form \udfff", "/model a\ud800", "/daily 08:00 \ud800", "/poem \ud800"])
async def test_a_lone_surrogate_gets_a_reply_that_can_be_sent(bot, text):
    commands, _, _ = bot
    reply = await commands.handle(who_for("private", USER), text)
    reply.text.encode("utf-8")


async def test_an_engine_that_fails_is_a_busy_reply_not_an_exception(bot):
    commands, _, engine = bot
    engine.error = ConnectionResetError("reset by peer")
    assert (await commands.handle(who_for("private", USER), "/poem 月")).text == BUSY
