"""End to end, poem cards and the buttons under every poem (issue 17, parts 3 and 4): the real
python-telegram-bot Application polling FakeBotApi, with the real LocalEngine on the tiny checkpoint or,
where only the bot's behaviour matters, the scripted engine. Photos arrive as multipart uploads and are
decoded as PNGs."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from bot.commands import NOT_IN_CHANNELS, NOT_ON_RECORD, UNKNOWN_BUTTON, Commands
from bot.console import chat
from bot.daily import job_name
from bot.db import Store
from bot_fixtures import *  # noqa: F401,F403
from bot_fixtures import RecordingEngine, ScriptedEngine, all_updates_handled, make_settings, running_bot

USER, OTHER, GROUP, CHANNEL = 42, 43, -1002000, -1003000
HAN = r"[\u4e00-\u9fff]"


@pytest.fixture
def settings(tmp_path, fake_api):
    return make_settings(tmp_path, telegram_base_url=fake_api.base_url)


def poem_text(text: str) -> str:
    return "".join(text.split("\n\n")[0].splitlines())


def is_qijue(poem: str) -> bool:
    return re.fullmatch(f"(?:{HAN}{{7}}，{HAN}{{7}}。){{2}}", poem) is not None


def buttons(message: dict) -> list[str]:
    return [b["callback_data"] for row in message["reply_markup"]["inline_keyboard"] for b in row]


def png(photo: dict) -> Image.Image:
    upload = photo["photo"]
    assert upload["content_type"] == "image/png"
    image = Image.open(io.BytesIO(upload["data"]))
    assert image.format == "PNG" and image.width > 300 and image.height > 300
    return image


def answers(api) -> list[str]:
    return [c.get("text") for c in api.calls_of("answerCallbackQuery")]


async def test_with_cards_on_a_poem_is_a_photo_with_the_poem_as_caption(settings, fake_api, local_engine, store):
    async with running_bot(settings, local_engine, store):
        fake_api.message(USER, "/card on")
        [on] = await fake_api.wait_for_sent(1)
        fake_api.message(USER, "/poem 月")
        [photo] = await fake_api.wait_for_photos(1)
        fake_api.message(USER, "/card off")
        fake_api.message(USER, "/poem 山")
        sent = await fake_api.wait_for_sent(3)
    assert "Cards: on" in on["text"] and store.chat_settings(USER).card is False
    assert is_qijue(poem_text(photo["caption"])) and photo["caption"].startswith("月"), photo["caption"]
    assert "七绝" in photo["caption"] and photo["chat_id"] == USER
    png(photo)
    assert buttons(photo) == ["fb:1:up", "fb:1:down", "again:1"]  # a card already: no 🖼
    assert "Cards: off" in sent[1]["text"] and is_qijue(poem_text(sent[2]["text"])) and len(fake_api.photos) == 1
    assert buttons(sent[2]) == ["fb:2:up", "fb:2:down", "again:2", "card:2"]


async def test_only_group_admins_switch_cards_and_anyone_may_ask(settings, fake_api, scripted_engine, store):
    fake_api.set_member(GROUP, 8, "administrator")
    async with running_bot(settings, scripted_engine, store):
        fake_api.message(GROUP, "/card on", user_id=7, chat_type="supergroup")
        [refused] = await fake_api.wait_for_sent(1)
        fake_api.message(GROUP, "/card", user_id=7, chat_type="supergroup")
        [_, shown] = await fake_api.wait_for_sent(2)
        fake_api.message(GROUP, "/card on", user_id=8, chat_type="supergroup")
        await fake_api.wait_for_sent(3)
        fake_api.message(GROUP, "/card maybe", user_id=8, chat_type="supergroup")
        bad = (await fake_api.wait_for_sent(4))[3]
    assert "administrators" in refused["text"] and "Cards: off" in shown["text"]
    assert store.chat_settings(GROUP).card is True and "Usage: /card on" in bad["text"]


async def test_the_card_button_sends_that_poems_card(settings, fake_api, scripted_engine, store):
    async with running_bot(settings, scripted_engine, store) as app:
        fake_api.message(USER, "/poem 月 舟")
        [poem] = await fake_api.wait_for_sent(1)
        fake_api.callback(USER, USER, poem, "card:1")
        [photo] = await fake_api.wait_for_photos(1)
        await all_updates_handled(app, fake_api)
    assert photo["caption"] == poem["text"] and photo["chat_id"] == USER
    png(photo)
    assert answers(fake_api) == ["正在画诗笺… / Drawing the card…"]
    assert not fake_api.calls_of("editMessageReplyMarkup") and len(scripted_engine.requests) == 1


async def test_the_again_button_writes_another_with_that_poems_settings_and_a_new_seed(settings, fake_api,
                                                                                    scripted_engine, store):
    async with running_bot(settings, scripted_engine, store) as app:
        for n, text in enumerate(["/form 五律", "/sample 1.3", "/model gru", "/poem 月 舟 秋", "/acrostic 春夏秋冬"], 1):
            fake_api.message(USER, text)
            await fake_api.wait_for_sent(n)
        keywords_poem, acrostic_poem = fake_api.sent[3], fake_api.sent[4]
        fake_api.message(USER, "/form 七绝")  # the chat's settings move on; 🔁 repeats the poem's own
        fake_api.message(USER, "/beam 3")
        await fake_api.wait_for_sent(7)
        fake_api.callback(USER, USER, keywords_poem, buttons(keywords_poem)[2])
        await fake_api.wait_for_sent(8)
        fake_api.callback(USER, USER, acrostic_poem, buttons(acrostic_poem)[2])
        sent = await fake_api.wait_for_sent(9)
        await all_updates_handled(app, fake_api)
    first, acrostic = scripted_engine.requests[:2]
    agains = scripted_engine.requests[2:]  # a seed that rewrote the same poem is tried once more
    again, acrostic_again = agains[0], agains[-1]
    for a, b in ((first, again), (acrostic, acrostic_again)):
        assert (b.prompt, b.keywords, b.acrostic, b.form, b.mode, b.temperature, b.model) == \
               (a.prompt, a.keywords, a.acrostic, a.form, a.mode, a.temperature, a.model)
        assert b.seed is not None
    assert (again.prompt, again.keywords, again.form, again.mode, again.temperature, again.model) == \
           ("月", ["舟", "秋"], "wulv", "sample", 1.3, "gru")
    assert acrostic_again.acrostic == "春夏秋冬"
    assert "五律" in sent[7]["text"] and sent[7]["text"].startswith("月")
    assert buttons(sent[7]) == ["fb:3:up", "fb:3:down", "again:3", "card:3"]
    assert store.poem(3)["keywords"] == '["舟", "秋"]' and store.poem(3)["source"] == "again"
    assert answers(fake_api) == ["再写一首… / Writing another…"] * 2


async def test_again_with_the_real_engine_writes_a_valid_poem_of_the_same_request(settings, fake_api, local_engine,
                                                                                store):
    engine = RecordingEngine(local_engine)
    async with running_bot(settings, engine, store):
        fake_api.message(USER, "/poem 月")
        [poem] = await fake_api.wait_for_sent(1)
        fake_api.callback(USER, USER, poem, "again:1")
        sent = await fake_api.wait_for_sent(2)
    assert is_qijue(poem_text(sent[1]["text"])) and sent[1]["text"].startswith("月")
    assert engine.requests[-1].seed is not None and engine.requests[-1].prompt == "月"


async def test_a_tap_naming_another_chats_poem_is_refused_and_changes_nothing(settings, fake_api, scripted_engine,
                                                                             store):
    async with running_bot(settings, scripted_engine, store) as app:
        fake_api.message(USER, "/poem 月")
        fake_api.message(OTHER, "/poem 山")
        sent = await fake_api.wait_for_sent(2)
        theirs = next(m for m in sent if m["chat_id"] == USER)
        mine = next(m for m in sent if m["chat_id"] == OTHER)
        their_id = buttons(theirs)[0].split(":")[1]
        for data in (f"fb:{their_id}:up", f"again:{their_id}", f"card:{their_id}"):  # forged, on OTHER's message
            fake_api.callback(OTHER, OTHER, mine, data)
        await fake_api.wait_for_calls("answerCallbackQuery", 3)
        await all_updates_handled(app, fake_api)
    assert answers(fake_api) == [NOT_ON_RECORD] * 3
    assert len(fake_api.sent) == 2 and not fake_api.photos and not fake_api.calls_of("editMessageReplyMarkup")
    assert len(scripted_engine.requests) == 2 and store.counts()["poems"] == 2 and store.counts()["likes"] == 0


@pytest.mark.parametrize("data", ["", "x", "fb:1", "fb:1:sideways", "again:", "again:-1", "card:1:up", "again:1 ",
                                  "again:99999999999999999999", "ＡＧＡＩＮ:1", "again:١", "fb:0:up", "card:0"])
async def test_malformed_callback_data_is_answered_and_changes_nothing(settings, fake_api, scripted_engine, store,
                                                                      data):
    async with running_bot(settings, scripted_engine, store) as app:
        fake_api.message(USER, "/poem 月")
        [poem] = await fake_api.wait_for_sent(1)
        fake_api.callback(USER, USER, poem, data)
        await fake_api.wait_for_calls("answerCallbackQuery")
        await all_updates_handled(app, fake_api)
    assert answers(fake_api) == [NOT_ON_RECORD if data in ("fb:0:up", "card:0") else UNKNOWN_BUTTON]
    assert len(fake_api.sent) == 1 and not fake_api.photos and not fake_api.calls_of("editMessageReplyMarkup")
    assert len(scripted_engine.requests) == 1 and store.counts()["poems"] == 1


async def test_again_and_card_taps_are_rate_limited_like_poem_commands(tmp_path, fake_api, scripted_engine, store):
    settings = make_settings(tmp_path, telegram_base_url=fake_api.base_url, rate_limit_count=2,
                             rate_limit_seconds=600.0)
    async with running_bot(settings, scripted_engine, store) as app:
        fake_api.message(USER, "/poem 月")  # token 1
        [poem] = await fake_api.wait_for_sent(1)
        fake_api.callback(USER, USER, poem, "again:1")  # token 2
        await fake_api.wait_for_sent(2)
        asked = len(scripted_engine.requests)  # 2, or 3 if its first seed happened to write the same poem
        fake_api.callback(USER, USER, poem, "again:1")  # none left
        fake_api.callback(USER, USER, poem, "card:1")
        await fake_api.wait_for_calls("answerCallbackQuery", 3)
        await all_updates_handled(app, fake_api)
        fake_api.message(USER, "/poem 山")
        limited = (await fake_api.wait_for_sent(3))[2]
    assert ["Too many" in a for a in answers(fake_api)] == [False, True, True]
    assert len(scripted_engine.requests) == asked and not fake_api.photos and "Too many poems" in limited["text"]


async def test_a_vote_updates_the_counts_and_keeps_the_other_buttons(settings, fake_api, scripted_engine, store):
    async with running_bot(settings, scripted_engine, store):
        fake_api.message(USER, "/poem 月")
        [poem] = await fake_api.wait_for_sent(1)
        fake_api.callback(USER, 5, poem, "fb:1:up")
        [edit] = await fake_api.wait_for_calls("editMessageReplyMarkup")
    rows = edit["reply_markup"]["inline_keyboard"]
    assert [b["text"] for b in rows[0]] == ["👍 1", "👎"] and buttons(edit) == buttons(poem)


async def test_a_daily_post_to_a_channel_is_a_picture_with_the_poem_as_caption(settings, fake_api, local_engine, store,
                                                                              clock):
    clock.set_local("07:00")
    async with running_bot(settings, local_engine, store, clock=clock) as app:
        fake_api.message(CHANNEL, "/daily 08:00", chat_type="channel")
        fake_api.message(USER, "/daily 08:00")
        await fake_api.wait_for_sent(2)
        clock.set_local("08:00", second=5)
        for chat in (CHANNEL, USER):
            [job] = app.job_queue.get_jobs_by_name(job_name(chat))
            await job.run(app)
        await fake_api.wait_for_photos(1)
        await fake_api.wait_for_sent(3)
    [photo] = fake_api.photos
    assert photo["chat_id"] == CHANNEL and is_qijue(poem_text(photo["caption"])), photo["caption"]
    png(photo)
    assert buttons(photo) == ["fb:1:up", "fb:1:down"]  # no 🔁 🖼 in a channel: every subscriber could tap them
    private = fake_api.sent[2]  # a private chat's daily poem stays text (cards off by default)
    assert private["chat_id"] == USER and is_qijue(poem_text(private["text"])) and "card:2" in buttons(private)
    assert [m["chat_id"] for m in fake_api.sent].count(CHANNEL) == 1  # the /daily answer only


async def test_in_a_channel_again_and_card_are_refused(settings, fake_api, scripted_engine, store):
    async with running_bot(settings, scripted_engine, store) as app:
        fake_api.message(CHANNEL, "/card off", chat_type="channel")
        fake_api.message(CHANNEL, "/poem 月", chat_type="channel")
        sent = await fake_api.wait_for_sent(2)
        poem = next(m for m in sent if "reply_markup" in m)
        for data in ("again:1", "card:1"):
            fake_api.callback(CHANNEL, 77, poem, data)  # a subscriber's tap on forged data
        await fake_api.wait_for_calls("answerCallbackQuery", 2)
        await all_updates_handled(app, fake_api)
    assert buttons(poem) == ["fb:1:up", "fb:1:down"]
    assert answers(fake_api) == [NOT_IN_CHANNELS] * 2 and len(fake_api.sent) == 2 and not fake_api.photos


async def test_inline_mode_offers_distinct_poems_from_the_real_engine(settings, fake_api, local_engine, store):
    engine = RecordingEngine(local_engine)
    async with running_bot(settings, engine, store):
        fake_api.inline_query(USER, "月")
        [answer] = await fake_api.wait_for_calls("answerInlineQuery")
    texts = [r["input_message_content"]["message_text"] for r in answer["results"]]
    assert len(texts) >= 2 and len(set(texts)) == len(texts), texts
    assert all(t.startswith("月") and is_qijue(poem_text(t)) for t in texts)
    assert len({r.seed for r in engine.requests}) == 3 and None not in {r.seed for r in engine.requests}


async def test_console_writes_the_card_and_prints_its_path(tmp_path, store):
    from bot.console import CONSOLE_ID

    commands = Commands(ScriptedEngine(), store, make_settings(tmp_path))
    out = io.StringIO()

    async def lines():
        for line in ("/card on", "/poem 月", "/card off", "/poem 山"):
            yield line

    await chat(commands, lines(), out, card_dir=tmp_path / "cards")
    text = out.getvalue()
    [path] = re.findall(r"\[🖼 (\S+)\]", text)
    assert path == str(tmp_path / "cards" / "poem-1.png") and Image.open(path).format == "PNG"
    assert text.count("[👍 /👎]") == 2 and list((tmp_path / "cards").iterdir()) == [tmp_path / "cards" / "poem-1.png"]
    assert store.chat_settings(CONSOLE_ID).card is False


async def test_cards_stay_on_across_a_restart(settings, fake_api, scripted_engine):
    store = Store.open(settings.database_path)
    async with running_bot(settings, scripted_engine, store):
        fake_api.message(USER, "/card on")
        await fake_api.wait_for_sent(1)
    store.close()
    store = Store.open(settings.database_path)
    async with running_bot(settings, scripted_engine, store):
        fake_api.message(USER, "/poem 月")
        [photo] = await fake_api.wait_for_photos(1)
    store.close()
    assert photo["caption"].startswith("月")
