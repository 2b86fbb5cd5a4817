"""bot.commands without Telegram: parsing, settings, permissions, errors, rate limit, help."""

from __future__ import annotations

import re
from dataclasses import asdict

import aiohttp
import pytest

from bot.commands import BUSY, COMMANDS, Commands, RateLimiter, Who, help_text
from engine.errors import EngineUnavailableError, QueueFullError
from bot_fixtures import *  # noqa: F401,F403
from bot_fixtures import ScriptedEngine, make_settings

ADMIN = 999
POEM_LINE = re.compile(r"^[\u4e00-\u9fff]+，[\u4e00-\u9fff]+。$")


@pytest.fixture
def commands(tmp_path, store, scripted_engine, clock) -> Commands:
    return Commands(scripted_engine, store, make_settings(tmp_path), clock=clock)


def private(user_id: int = 42) -> Who:
    return Who(chat_id=user_id, user_id=user_id, chat_type="private")


def group(user_id: int, is_admin: bool, chat_id: int = -100) -> Who:
    async def is_chat_admin():
        return is_admin
    return Who(chat_id=chat_id, user_id=user_id, chat_type="supergroup", is_chat_admin=is_chat_admin)


def poem_lines(text: str) -> list[str]:
    """The poem's couplet lines of a reply (the footer follows a blank line)."""
    return text.split("\n\n")[0].splitlines()


async def test_poem_opens_with_the_prompt_in_the_chat_form(commands, scripted_engine):
    reply = await commands.handle(private(), "/poem 月")
    couplets = poem_lines(reply.text)
    assert len(couplets) == 2 and all(POEM_LINE.match(c) for c in couplets)
    assert couplets[0].startswith("月") and len(couplets[0]) == 16
    assert reply.poem_id is not None
    assert scripted_engine.requests[-1].form == "qijue"


async def test_poem_without_prompt_picks_a_random_opening(commands, scripted_engine):
    reply = await commands.handle(private(), "/poem")
    assert reply.poem_id is not None
    assert len(scripted_engine.requests[-1].prompt) == 1


async def test_plain_text_in_a_private_chat_works_like_poem(commands, scripted_engine):
    reply = await commands.handle(private(), "春")
    assert reply.poem_id is not None and scripted_engine.requests[-1].prompt == "春"


async def test_plain_text_in_a_group_is_ignored(commands, scripted_engine):
    assert await commands.handle(group(1, True), "春") is None
    assert scripted_engine.requests == []


async def test_command_addressed_with_bot_username_is_understood(commands):
    reply = await commands.handle(private(), "/poem@yinshi_bot 月")
    assert reply.poem_id is not None


@pytest.mark.parametrize("command", ["/acrostic", "/cangtou"])
async def test_acrostic_asks_the_engine_for_those_heads_in_the_chats_line_length(commands, scripted_engine, command):
    """What the bot decides: the heads go to the engine as `acrostic` (not as a prompt), and four heads in a
    chat set to 七律 ask for 七绝 (same line length, four lines). Putting them at the line heads is the engine's."""
    await commands.handle(private(), "/form 七律")
    reply = await commands.handle(private(), f"{command} 春夏秋冬")
    [request] = scripted_engine.requests
    assert (request.acrostic, request.prompt, request.form) == ("春夏秋冬", "", "qijue")
    assert reply.poem_id is not None


async def test_acrostic_with_eight_characters_writes_a_lushi(commands, scripted_engine):
    await commands.handle(private(), "/form 五绝")
    await commands.handle(private(), "/acrostic 春夏秋冬春夏秋冬")
    assert scripted_engine.requests[-1].form == "wulv"


@pytest.mark.parametrize("text", ["/acrostic", "/acrostic 春夏", "/acrostic abcd", "/acrostic 春夏秋冬雪"])
async def test_bad_acrostic_explains_four_or_eight(commands, scripted_engine, text):
    reply = await commands.handle(private(), text)
    assert "4 or 8" in reply.text and reply.poem_id is None
    assert scripted_engine.requests == []


@pytest.mark.parametrize("text, setting", [
    ("/form 五律", {"form": "wulv"}), ("/form wujue", {"form": "wujue"}), ("/form 七言律诗", {"form": "qilv"}),
    ("/greedy", {"mode": "greedy"}), ("/sample", {"mode": "sample", "temperature": 0.6}),
    ("/sample 1.5", {"mode": "sample", "temperature": 1.5}), ("/beam 5", {"mode": "beam", "beam_width": 5}),
    ("/beam 16", {"mode": "beam", "beam_width": 16}), ("/model gru", {"model": "gru"}),
])
async def test_setting_commands_store_the_setting(commands, store, text, setting):
    await commands.handle(private(), text)
    stored = asdict(store.chat_settings(42))
    assert {k: stored[k] for k in setting} == setting


@pytest.mark.parametrize("text, allowed", [
    ("/beam 0", "1 to 16"), ("/beam 999", "1 to 16"), ("/beam abc", "1 to 16"), ("/beam", "1 to 16"),
    ("/beam 5.5", "1 to 16"), ("/beam -3", "1 to 16"),
    ("/form 九言", "allowed"), ("/form", "Usage"), ("/sample 0", "(0, 2]"), ("/sample 3", "(0, 2]"),
    ("/sample nan", "(0, 2]"), ("/sample inf", "(0, 2]"), ("/sample hot", "(0, 2]"), ("/greedy now", "no arguments"),
    ("/model transformer", "loaded"), ("/daily 25:00", "HH:MM"), ("/daily 8", "HH:MM"), ("/daily 08:00 九言", "allowed"),
])
async def test_bad_arguments_say_what_is_allowed_and_change_nothing(commands, store, text, allowed):
    before = (asdict(store.chat_settings(42)), store.subscription(42))
    reply = await commands.handle(private(), text)
    assert allowed in reply.text
    assert (asdict(store.chat_settings(42)), store.subscription(42)) == before


@pytest.mark.parametrize("prompt, expected", [
    ("月" * 40, "too long"), ("🌙", "Han characters"), ("moon", "Han characters"), ("月🌙", "Han characters"),
])
async def test_bad_prompts_get_a_clear_reply_and_never_reach_the_engine(commands, scripted_engine, prompt, expected):
    reply = await commands.handle(private(), f"/poem {prompt}")
    assert expected in reply.text and reply.poem_id is None
    assert scripted_engine.requests == []


async def test_unknown_character_from_the_engine_is_explained(commands):
    reply = await commands.handle(private(), "/poem 龘")
    assert "does not know" in reply.text and reply.poem_id is None


@pytest.mark.parametrize("error", [QueueFullError(2.0), EngineUnavailableError("down"),
                                   aiohttp.ClientConnectionError("refused"), ConnectionRefusedError(),
                                   TimeoutError()])
async def test_busy_or_unreachable_engine_gets_a_short_busy_reply(commands, scripted_engine, error):
    scripted_engine.error = error
    reply = await commands.handle(private(), "/poem 月")
    assert reply.text == BUSY and reply.poem_id is None


async def test_beam_changes_the_request_the_engine_gets(commands, scripted_engine):
    await commands.handle(private(), "/beam 5")
    await commands.handle(private(), "/poem 月")
    request = scripted_engine.requests[-1]
    assert (request.mode, request.beam_width) == ("beam", 5)


async def test_settings_shows_every_setting(commands):
    await commands.handle(private(), "/beam 7")
    text = (await commands.handle(private(), "/settings")).text
    assert "七绝" in text and "beam, width 7" in text and "default" in text and "Daily poem: off" in text


def test_help_lists_every_command():
    text = help_text()
    for name, command in COMMANDS.items():
        assert f"/{name}" in text
        assert command.zh in text and command.en in text


async def test_help_is_chinese_first_then_english(commands):
    text = (await commands.handle(private(), "/help")).text
    assert text.index("命令") < text.index("commands")


async def test_unknown_command_points_to_help(commands):
    assert "/help" in (await commands.handle(private(), "/frobnicate")).text


@pytest.mark.parametrize("text", ["/status", "/reload", "/retrain"])
async def test_admin_commands_refuse_other_users(commands, scripted_engine, text):
    reply = await commands.handle(private(42), text)
    assert "admins only" in reply.text and scripted_engine.reloads == 0


async def test_admin_status_reports_engine_and_counts(commands):
    await commands.handle(private(), "/poem 月")
    text = (await commands.handle(private(999), "/status")).text
    assert "queue_depth" in text and "poems: 1" in text and "uptime" in text


async def test_admin_reload_asks_the_engine(commands, scripted_engine):
    text = (await commands.handle(private(999), "/reload")).text
    assert scripted_engine.reloads == 1 and "unchanged" in text


async def test_retrain_without_a_trainer_says_it_is_not_configured(commands):
    assert "not configured" in (await commands.handle(private(999), "/retrain")).text


async def test_retrain_calls_the_pluggable_trainer_and_reports(commands):
    calls = []

    async def retrain():
        calls.append(1)
        return {"version": "v2", "val_ppl": 123.4}

    commands.retrain = retrain
    text = (await commands.handle(private(999), "/retrain")).text
    assert calls == [1] and "v2" in text


async def test_retrain_failure_is_reported_not_raised(commands):
    def retrain():
        raise RuntimeError("corpus missing")

    commands.retrain = retrain
    assert "corpus missing" in (await commands.handle(private(999), "/retrain")).text


@pytest.mark.parametrize("text", ["/beam 5", "/form 五绝", "/greedy", "/model gru", "/daily 08:00", "/daily off"])
async def test_group_members_who_are_not_admins_cannot_change_settings(commands, store, text):
    reply = await commands.handle(group(7, is_admin=False), text)
    assert "administrators" in reply.text
    assert store.chat_settings(-100) == type(store.chat_settings(-100))() and store.subscription(-100) is None


async def test_group_admins_can_change_settings_and_anyone_can_read_them(commands, store):
    await commands.handle(group(7, is_admin=True), "/daily 08:00 五绝")
    assert store.subscription(-100).time == "08:00"
    assert "08:00" in (await commands.handle(group(8, is_admin=False), "/daily")).text
    assert (await commands.handle(group(8, is_admin=False), "/poem 月")).poem_id is not None


async def test_channel_posts_may_change_settings(commands, store):
    channel = Who(chat_id=-1001, user_id=None, chat_type="channel")
    await commands.handle(channel, "/beam 3")
    assert store.chat_settings(-1001).beam_width == 3


async def test_daily_subscribes_shows_and_stops(commands, store):
    changed = []
    commands.on_subscription_change = changed.append
    assert "every day at 08:00" in (await commands.handle(private(), "/daily 8:00 wujue")).text
    assert store.subscription(42).form == "wujue"
    assert "08:00" in (await commands.handle(private(), "/daily")).text
    assert "stopped" in (await commands.handle(private(), "/daily off")).text
    assert store.subscription(42) is None and changed == [42, 42]


async def test_poem_requests_are_rate_limited_per_user(tmp_path, store, scripted_engine, clock):
    ticks = iter(range(100))
    limiter = RateLimiter(2, 60, clock=lambda: next(ticks))
    commands = Commands(scripted_engine, store, make_settings(tmp_path), clock=clock, rate_limiter=limiter)
    assert (await commands.handle(private(1), "/poem 月")).poem_id is not None
    assert (await commands.handle(private(1), "/poem 月")).poem_id is not None
    limited = await commands.handle(private(1), "/poem 月")
    assert limited.poem_id is None and "try again in" in limited.text
    assert (await commands.handle(private(2), "/poem 月")).poem_id is not None  # another user is not limited
    assert "beam" in (await commands.handle(private(1), "/beam 4")).text  # settings are not limited


async def test_card_on_and_off_is_stored_and_poems_follow_it(commands, store):
    assert "Cards: off (the default here)" in (await commands.handle(private(), "/card")).text
    assert (await commands.handle(private(), "/poem 月")).photo is None
    assert "Cards: on" in (await commands.handle(private(), "/card on")).text and store.chat_settings(42).card is True
    reply = await commands.handle(private(), "/poem 月")
    assert reply.photo[:8] == b"\x89PNG\r\n\x1a\n" and reply.text.startswith("月") and reply.poem_id is not None
    assert "cards: on" in (await commands.handle(private(), "/settings")).text
    assert "Cards: off" in (await commands.handle(private(), "/card 关")).text and store.chat_settings(42).card is False


@pytest.mark.parametrize("text", ["/card yes", "/card on off", "/card 1", "/card onn"])
async def test_bad_card_arguments_say_what_is_allowed_and_change_nothing(commands, store, text):
    reply = await commands.handle(private(), text)
    assert "Usage: /card on" in reply.text and store.chat_settings(42).card is None


async def test_channels_get_cards_unless_they_say_off(commands, store):
    channel = Who(chat_id=-1001, user_id=None, chat_type="channel")
    reply = await commands.handle(channel, "/poem 月")
    assert reply.photo is not None and not reply.actions  # no 🔁 🖼 for subscribers to tap
    await commands.handle(channel, "/card off")
    assert (await commands.handle(channel, "/poem 月")).photo is None


def test_a_cards_title_names_the_form_and_the_opening_keywords_acrostic_or_tune():
    from bot.commands import poem_card_title

    assert poem_card_title("qijue", None, "月") == "七绝 · 月"
    assert poem_card_title("wulv", None, "月", ["舟", "秋"]) == "五律 · 月 舟 秋"
    assert poem_card_title("wujue", None, "", [], "春夏秋冬") == "五绝 · 藏头 春夏秋冬"
    assert poem_card_title("ci", "水调歌头", "明月") == "词 · 水调歌头"


async def test_a_ci_result_gets_a_card_though_ci_is_no_shi_form(commands):
    from engine.api import PoemResult

    text = "明月几时有？把酒问青天。不知天上宫阙，今夕是何年。\n转朱阁，低绮户，照无眠。不应有恨，何事长向别时圆？"
    result = PoemResult(poem=text, lines=[], form="ci", mode="beam", model={"name": "lstm", "version": "v"},
                        elapsed_ms=1.0, tune="水调歌头")
    assert (await commands.card_png(result, "明月"))[:4] == b"\x89PNG"


async def test_again_tries_a_second_seed_when_the_first_writes_the_same_poem(commands, scripted_engine, store):
    poem_id = (await commands.handle(private(), "/poem 月")).poem_id
    scripted_engine.ignore_seed = True  # every seed writes the same poem
    tap = await commands.tap(private(), f"again:{poem_id}")
    reply = await tap.then()
    seeds = [r.seed for r in scripted_engine.requests[1:]]
    assert len(seeds) == 2 and None not in seeds and seeds[0] != seeds[1]
    assert reply.poem_id == poem_id + 1 and reply.text.startswith("月")  # still sent: the model is that sure


def test_rate_limiter_window_slides():
    now = [0.0]
    limiter = RateLimiter(2, 10, clock=lambda: now[0])
    assert limiter.acquire("u") == 0 and limiter.acquire("u") == 0
    assert limiter.acquire("u") == pytest.approx(10)
    now[0] = 10.0
    assert limiter.acquire("u") == 0


async def test_feedback_is_stored_once_per_user(commands, store):
    reply = await commands.handle(group(1, False, chat_id=-100), "/poem 月")
    await commands.feedback(group(1, False, chat_id=-100), reply.poem_id, 1)  # two members of the same group
    await commands.feedback(group(2, False, chat_id=-100), reply.poem_id, 1)
    tap = await commands.feedback(group(2, False, chat_id=-100), reply.poem_id, -1)
    assert tap.counts == (1, 1) and not tap.refused


async def test_feedback_on_an_unknown_poem_is_answered_politely(commands):
    tap = await commands.feedback(private(), 12345, 1)
    assert "no longer" in tap.answer and tap.refused and tap.counts is None


# fuzzing: any text, any arguments

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st  # noqa: E402

from bot.db import Store  # noqa: E402

SETTING_COMMANDS = ["/beam", "/form", "/sample", "/model", "/daily", "/greedy", "/acrostic", "/poem"]


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(SETTING_COMMANDS + ["/" + "x" * 3, ""]),
       arg=st.text(max_size=60), chat_type=st.sampled_from(["private", "group", "channel"]))
def test_any_text_gets_a_reply_and_rejected_arguments_change_nothing(tmp_path, command, arg, chat_type):
    import asyncio

    async def go():
        store = Store.open(":memory:")
        commands = Commands(ScriptedEngine(), store, make_settings(tmp_path))
        who = Who(chat_id=5, user_id=5, chat_type=chat_type)
        before = (asdict(store.chat_settings(5)), store.subscription(5))
        reply = await commands.handle(who, f"{command} {arg}")  # noqa: B023
        after = (asdict(store.chat_settings(5)), store.subscription(5))
        return reply, before, after

    reply, before, after = asyncio.run(go())
    text = f"{command} {arg}".strip()
    if reply is None:  # empty, or plain text outside a private chat: not for the bot
        assert not text or (chat_type != "private" and not text.startswith("/"))
        return
    assert reply.text and "Traceback" not in reply.text
    if command == "/beam" and after != before:
        assert re.fullmatch(r"\d{1,3}", arg.strip()) and 1 <= int(arg) <= 16
    if command in ("/beam", "/form", "/sample", "/model", "/daily") and after != before:
        assert "Usage" not in reply.text and "Unknown" not in reply.text and "allowed" not in reply.text


def test_every_command_has_exactly_one_handler_and_every_handler_a_command(commands):
    assert set(commands.handlers) == set(COMMANDS)


async def test_feedback_on_a_poem_of_another_chat_is_refused(commands, store):
    theirs = (await commands.handle(private(7), "/poem 月")).poem_id
    tap = await commands.feedback(private(42), theirs, 1)  # forged callback data naming their poem
    assert tap.refused and tap.counts is None and store.feedback_counts(theirs) == (0, 0)
    ours = (await commands.handle(private(42), "/poem 月")).poem_id
    assert (await commands.feedback(private(42), ours, 1)).counts == (1, 0)


async def test_feedback_taps_are_rate_limited_per_user(commands, store):
    poem_id = (await commands.handle(private(42), "/poem 月")).poem_id
    answers = [await commands.feedback(private(42), poem_id, 1 if i % 2 else -1) for i in range(100)]
    limited = [tap for tap in answers if "Too many" in tap.answer]
    assert limited and len(limited) < 100 and all(tap.refused and tap.counts is None for tap in limited)
    other = await commands.feedback(Who(chat_id=42, user_id=43), poem_id, 1)  # someone else in the chat
    assert not other.refused and "Too many" not in other.answer


async def test_another_poem_tapped_while_the_database_is_locked_replies_busy(tmp_path, scripted_engine, clock):
    """The tap is answered first ("Writing another…"); the poem comes after, and is recorded. If the database
    is locked by then, the chat gets the busy reply instead of nothing."""
    import sqlite3

    from bot.commands import STORE_BUSY
    from bot.db import Store

    store = Store.open(tmp_path / "bot.db", busy_timeout=0.2)
    commands = Commands(scripted_engine, store, make_settings(tmp_path), clock=clock)
    poem_id = (await commands.handle(private(42), "/poem 月")).poem_id
    tap = await commands.tap(private(42), f"again:{poem_id}")
    assert not tap.refused and tap.then is not None
    other = sqlite3.connect(tmp_path / "bot.db", timeout=0)
    other.execute("BEGIN EXCLUSIVE")  # another writer (a backup, the CLI) holds the lock
    try:
        reply = await tap.then()
    finally:
        other.rollback()
        other.close()
        store.close()
    assert reply.text == STORE_BUSY


# -- /ciyun: a poem on another's rhymes (次韵) ------------------------------------------------------------------
JINGYESI = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"


async def test_ciyun_asks_for_the_poems_form_and_its_rhymes_in_order_with_the_opening(commands, scripted_engine, store):
    await commands.handle(private(), "/form 七律")  # 次韵 keeps the answered poem's form, not the chat's
    reply = await commands.handle(private(), f"/ciyun 月 {JINGYESI}")
    [request] = scripted_engine.requests
    # Line 1 rhymes too (光, 首句入韵), so its rhyme comes first.
    assert (request.form, request.rhymes, request.prompt) == ("wujue", "光霜乡", "月")
    lines = poem_lines(reply.text)
    assert [lines[0][4], lines[0][10], lines[1][10]] == list("光霜乡")
    # A line must reach a given character: beam mode searches at least 16 wide, and the footer says so.
    assert request.mode == "beam" and request.beam_width == 16 and "beam 16" in reply.text
    assert (await store.aio.poem(reply.poem_id))["rhymes"] == "光霜乡"


async def test_ciyun_without_an_opening_lets_the_model_begin_and_keeps_a_sampling_chats_mode(commands, scripted_engine):
    await commands.handle(private(), "/sample 0.7")
    await commands.handle(private(), "/ciyun 床前明月光 疑是地上霜 举头望明月 低头思故乡")
    [request] = scripted_engine.requests[-1:]
    assert (request.prompt, request.rhymes, request.mode, request.temperature) == ("", "光霜乡", "sample", 0.7)


async def test_ciyun_in_reply_to_a_poem_the_bot_sent_answers_that_poem(commands, scripted_engine):
    sent = await commands.handle(private(), "/poem 月")
    who = Who(chat_id=42, user_id=42, chat_type="private", replied=sent.text)  # the poem, a blank line, the footer
    reply = await commands.handle(who, "/ciyun 春")
    request = scripted_engine.requests[-1]
    first = scripted_engine.requests[0]
    lines = poem_lines(sent.text)
    ends = [lines[0][6], lines[0][14], lines[1][14]]  # 七绝: the ends of lines 1 (if it rhymes), 2 and 4
    assert request.form == first.form == "qijue" and request.prompt == "春"
    assert request.rhymes in ("".join(ends), "".join(ends[1:]))
    assert reply.poem_id is not None


async def test_again_on_a_ciyun_poem_answers_the_same_rhymes(commands, scripted_engine):
    poem_id = (await commands.handle(private(), f"/ciyun {JINGYESI}")).poem_id
    reply = await (await commands.tap(private(), f"again:{poem_id}")).then()
    first, *again = scripted_engine.requests  # a seed that writes the same poem again is tried once more
    assert again and all((r.form, r.rhymes, r.beam_width) == (first.form, first.rhymes, 16) and r.seed is not None
                         for r in again)
    assert reply.poem_id == poem_id + 1


@pytest.mark.parametrize("text", ["/ciyun", "/ciyun 秋", "/ciyun 床前明月光", "/ciyun moon light"])
async def test_ciyun_without_a_poem_explains_itself_and_asks_nothing(commands, scripted_engine, text):
    reply = await commands.handle(private(), text)
    assert "/ciyun" in reply.text and "绝句" in reply.text and reply.poem_id is None
    assert scripted_engine.requests == []


async def test_rhymes_the_engine_refuses_are_explained(commands, scripted_engine):
    from engine.errors import RequestError

    scripted_engine.error = RequestError("bad_rhymes", "rhymes", "「晓」 has no level-tone (平) reading")
    reply = await commands.handle(private(), "/ciyun 春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。")
    assert "次韵" in reply.text and "「晓」" in reply.text and reply.poem_id is None


def test_a_ciyun_cards_title_names_the_rhymes():
    from bot.commands import poem_card_title

    assert poem_card_title("wujue", rhymes="光霜乡") == "五绝 · 次韵 光霜乡"


async def test_model_while_the_engine_cannot_list_its_models_is_busy_and_changes_nothing(commands, scripted_engine, store):
    async def down():
        raise EngineUnavailableError("engine down")

    scripted_engine.models = down
    before = asdict(store.chat_settings(42))
    for text in ("/model ci", "/model gru", "/model"):
        assert (await commands.handle(private(), text)).text == BUSY
    assert asdict(store.chat_settings(42)) == before  # not even a 词-only model slipped in


@pytest.mark.parametrize("form, tune, resume", [("wulv", None, "/daily 08:00 五律"), ("ci", "浣溪沙", "/daily 08:00 浣溪沙"),
                                              (None, None, "/daily 08:00")])
async def test_a_paused_subscription_names_the_command_that_resumes_it_as_it_was(commands, scripted_engine, store,
                                                                                form, tune, resume):
    async def models():
        return [{"name": "lstm", "writes_ci": True}]

    scripted_engine.models = models
    store.subscribe(42, "08:00", form, tune=tune)
    store.pause_subscription(42, "Forbidden: bot was blocked by the user")
    text = (await commands.handle(private(), "/daily")).text
    assert f"发送 {resume} 恢复" in text and f"; {resume} resumes it" in text
    await commands.handle(private(), resume)
    sub = store.subscription(42)
    assert not sub.paused and (sub.form, sub.tune) == (form, tune)


@pytest.mark.parametrize("message", [
    f"{JINGYESI}\n\n— 五绝 · beam 5 · lstm-large",  # the bot's own, with its footer
    f"静夜思\n\n{JINGYESI}",  # a title, a blank line, the poem
    "床前明月光，疑是地上霜。\n\n举头望明月，低头思故乡。",  # a blank line between the couplets
])
async def test_ciyun_finds_the_poem_in_the_message_it_replies_to(commands, scripted_engine, message):
    who = Who(chat_id=42, user_id=42, chat_type="private", replied=message)
    reply = await commands.handle(who, "/ciyun 秋")
    request = scripted_engine.requests[-1]
    assert (request.form, request.rhymes, request.prompt) == ("wujue", "光霜乡", "秋") and reply.poem_id is not None
