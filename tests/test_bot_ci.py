"""词 in the bot (issue 18): /ci and /tunes, 🔁 of a 词, /daily with a tune, and the console — with the real
LocalEngine serving the tiny 诗 model beside the tiny 词 model, and the real PTB client on FakeBotApi."""

from __future__ import annotations

import datetime as dt
import io

import pytest

from bot.commands import Commands, Who, tunes_text
from bot.console import chat
from bot.daily import Daily
from bot.db import Store
from bot_fixtures import *  # noqa: F401,F403
from bot_fixtures import TZ, make_settings, running_bot
from engine.poem.tunes import TUNES, check_ci

USER, CHANNEL = 42, -1003000


@pytest.fixture
async def ci_engine(tmp_path, tiny_checkpoint, tiny_ci_checkpoint):
    from engine.model import versions as checkpoint_store
    from engine.serving.local import EngineSettings, LocalEngine

    root = tmp_path / "checkpoints"
    checkpoint_store.publish(root, "lstm", tiny_checkpoint)
    checkpoint_store.publish(root, "ci", tiny_ci_checkpoint)
    engine = LocalEngine(EngineSettings(checkpoint_dir=str(root), model_names=("lstm", "ci"), device="cpu",
                                        max_num_rows=64, max_queue=64, watch_interval=0.0, threads=1))
    await engine.start()
    yield engine
    await engine.close()


def ci_of(text: str) -> str:
    """The 词 of a reply: its stanzas (a blank line apart, one sentence a line) back as the engine's text."""
    body = text.rsplit("\n\n— ", 1)[0]
    return "\n".join(stanza.replace("\n", "") for stanza in body.split("\n\n"))


def private() -> Who:
    return Who(chat_id=USER, user_id=USER, chat_type="private")


async def test_ci_writes_the_tune_with_the_opening_and_keywords_and_stores_it(tmp_path, ci_engine, store):
    commands = Commands(ci_engine, store, make_settings(tmp_path))
    reply = await commands.handle(private(), "/ci 浣溪沙 春风 孤舟")
    text = ci_of(reply.text)
    assert check_ci(TUNES["浣溪沙"], text).structure_ok, reply.text
    assert text.startswith("春风") and "孤舟" in text.replace("\n", "") and text.count("\n") == 1
    assert reply.text.endswith("— 词 · 浣溪沙 · beam 5 · ci")
    poem = store.poem(reply.poem_id)
    assert (poem["form"], poem["tune"], poem["model"]) == ("ci", "浣溪沙", "ci")


async def test_a_traditional_tune_name_works_and_an_unknown_one_points_to_tunes(tmp_path, ci_engine, store):
    commands = Commands(ci_engine, store, make_settings(tmp_path))
    reply = await commands.handle(private(), "/ci 菩薩蠻")
    assert check_ci(TUNES["菩萨蛮"], ci_of(reply.text)).structure_ok
    for text in ("/ci 不存在调 月", "/ci"):
        reply = await commands.handle(private(), text)
        assert reply.poem_id is None and "/tunes" in reply.text
    assert store.counts()["poems"] == 1


async def test_ci_follows_the_chats_decoding_but_not_its_model(tmp_path, ci_engine, store):
    commands = Commands(ci_engine, store, make_settings(tmp_path))
    await commands.handle(private(), "/model lstm")
    await commands.handle(private(), "/sample 0.9")
    reply = await commands.handle(private(), "/ci 鹧鸪天 秋")
    assert reply.text.endswith("— 词 · 鹧鸪天 · sample t=0.9 · ci")


async def test_model_offers_only_the_models_that_write_shi_and_points_a_ci_model_to_ci(tmp_path, ci_engine, store):
    commands = Commands(ci_engine, store, make_settings(tmp_path))
    assert "/model lstm." in (await commands.handle(private(), "/model")).text  # ci is not offered
    reply = await commands.handle(private(), "/model ci")
    assert "ci writes 词 only: use /ci TUNE" in reply.text
    assert (await store.aio.chat_settings(USER)).model is None  # nothing changed
    assert {m["name"]: m["writes_shi"] for m in await ci_engine.models()} == {"lstm": True, "ci": False}


async def test_without_a_ci_model_ci_says_so(tmp_path, local_engine, store):
    commands = Commands(local_engine, store, make_settings(tmp_path))
    reply = await commands.handle(private(), "/ci 浣溪沙 月")
    assert reply.poem_id is None and "No model here writes 词" in reply.text


async def test_tunes_lists_every_tune_with_its_shape():
    text = tunes_text()
    assert all(name in text for name in TUNES) and "浣溪沙 42字 3+3句" in text and len(text) < 4096


async def test_the_again_button_writes_the_same_tune_again(settings_api, fake_api, ci_engine, store):
    async with running_bot(settings_api, ci_engine, store):
        fake_api.message(USER, "/ci 西江月 江")
        [first] = await fake_api.wait_for_sent(1)
        fake_api.callback(USER, USER, first, "again:1")
        [_, again] = await fake_api.wait_for_sent(2)
    assert ci_of(again["text"]) != ci_of(first["text"]) and ci_of(again["text"]).startswith("江")
    assert check_ci(TUNES["西江月"], ci_of(again["text"])).structure_ok
    assert store.poem(2)["tune"] == "西江月"


async def test_daily_with_a_tune_posts_that_tune(tmp_path, ci_engine, store, clock):
    sent = []

    async def send(chat_id, reply):
        sent.append(reply)

    commands = Commands(ci_engine, store, make_settings(tmp_path), clock=clock)
    reply = await commands.handle(Who(chat_id=CHANNEL, user_id=None, chat_type="channel"), "/daily 08:00 浣溪沙")
    assert "浣溪沙" in reply.text and store.subscription(CHANNEL).tune == "浣溪沙"
    daily = Daily(store, commands, send, TZ, dt.timedelta(hours=2), clock=clock)
    clock.set_local("08:00")
    assert await daily.post_if_due(CHANNEL)
    [post] = sent
    assert post.photo is not None  # a channel's daily post is a card
    assert check_ci(TUNES["浣溪沙"], ci_of(post.text)).structure_ok and post.text.endswith("· ci")
    reply = await commands.handle(Who(chat_id=CHANNEL, user_id=None, chat_type="channel"), "/daily 08:00 无此调")
    assert "Unknown form or tune" in reply.text and store.subscription(CHANNEL).tune == "浣溪沙"


async def test_the_console_writes_ci_and_lists_tunes(tmp_path, ci_engine):
    store = Store.open(tmp_path / "console.db")
    out = io.StringIO()

    async def lines():
        for line in ("/tunes", "/ci 如梦令 春夜"):
            yield line

    try:
        await chat(Commands(ci_engine, store, make_settings(tmp_path)), lines(), out, card_dir=tmp_path / "cards")
    finally:
        store.close()
    text = out.getvalue()
    assert "如梦令 33字 7句" in text and "— 词 · 如梦令" in text


@pytest.fixture
def settings_api(tmp_path, fake_api):
    return make_settings(tmp_path, telegram_base_url=fake_api.base_url)


async def test_daily_with_a_tune_is_refused_where_no_model_writes_ci(tmp_path, local_engine, store, clock):
    commands = Commands(local_engine, store, make_settings(tmp_path), clock=clock)
    reply = await commands.handle(private(), "/daily 08:00 浣溪沙")
    assert "No model here writes 词" in reply.text and store.subscription(USER) is None


async def test_a_daily_ci_the_engine_refuses_pauses_the_subscription_with_the_reason(tmp_path, local_engine, store, clock):
    """The 词 model went away after /daily 08:00 浣溪沙: the post is paused, saying why, not retried all morning."""
    sent = []

    async def send(chat_id, reply):
        sent.append(reply)

    commands = Commands(local_engine, store, make_settings(tmp_path), clock=clock)
    store.subscribe(CHANNEL, "08:00", "ci", since=clock(), chat_type="channel", tune="浣溪沙")
    daily = Daily(store, commands, send, TZ, dt.timedelta(hours=2), clock=clock)
    clock.set_local("08:00")
    assert not await daily.post_if_due(CHANNEL)
    sub = store.subscription(CHANNEL)
    assert sent == [] and sub.paused and "writes 词" in sub.paused_reason
    assert "/daily 08:00" in await commands.describe_subscription(CHANNEL)
