"""bot.db: schema and migrations, settings, subscriptions and the once-only claim, poems, feedback."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from bot.db import SCHEMA_VERSION, ChatSettings, Store
from bot_fixtures import *  # noqa: F401,F403
from bot_fixtures import run_in_threads
from engine.api import PoemResult


def a_result(poem: str = "月山水花风，云春秋天人。江河日夜明，清白青长空。") -> PoemResult:
    lines = [x for x in poem.replace("。", "，").split("，") if x]
    return PoemResult(poem=poem, lines=lines, form="wujue", mode="beam", model={"name": "lstm", "version": "v1"},
                      elapsed_ms=3.0)


def test_open_creates_the_schema_in_wal_mode(tmp_path):
    store = Store.open(tmp_path / "sub" / "bot.db")
    assert store.schema_version() == SCHEMA_VERSION
    assert store.db.journal_mode == "wal"
    assert {"chats", "subscriptions", "poems", "feedback"} <= set(store.db.table_names())


def test_reopening_does_not_migrate_again_or_lose_data(tmp_path):
    store = Store.open(tmp_path / "bot.db")
    store.update_chat_settings(1, form="wulv")
    store.close()
    again = Store.open(tmp_path / "bot.db")
    assert again.schema_version() == SCHEMA_VERSION and again.chat_settings(1).form == "wulv"


def test_a_database_from_a_newer_bot_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "bot.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this bot"):
        Store.open(tmp_path / "bot.db")


def test_a_version_1_database_keeps_its_subscriptions_active_after_migrating(tmp_path):
    import sqlite_utils

    from bot.db import MIGRATIONS

    db = sqlite_utils.Database(tmp_path / "bot.db")
    MIGRATIONS[0](db)
    db.execute("PRAGMA user_version = 1")
    db["subscriptions"].insert({"chat_id": 7, "time": "08:00", "paused": 0, "last_posted_date": "2026-05-01",
                                "created_at": "2026-04-01T00:00:00+00:00"})
    db.conn.commit()
    db.close()
    store = Store.open(tmp_path / "bot.db")
    assert store.schema_version() == SCHEMA_VERSION
    assert [s.chat_id for s in store.active_subscriptions()] == [7]
    assert store.unsubscribe(7) and store.subscription(7) is None and not store.unsubscribe(7)
    assert store.subscribe(7, "09:00", None).last_posted_date == "2026-05-01"  # kept across /daily off
    store.close()


def test_chat_settings_default_until_changed(store):
    assert store.chat_settings(5) == ChatSettings()
    store.update_chat_settings(5, mode="beam", beam_width=9)
    assert store.chat_settings(5) == ChatSettings(mode="beam", beam_width=9)


def test_update_chat_settings_rejects_unknown_names(store):
    with pytest.raises(TypeError):
        store.update_chat_settings(5, colour="red")


def test_writes_are_visible_to_another_connection_at_once(tmp_path, store):
    store.update_chat_settings(5, form="qilv")
    store.subscribe(5, "08:00", None)
    other = Store.open(tmp_path / "bot.db")
    assert other.chat_settings(5).form == "qilv" and other.subscription(5).time == "08:00"


def test_subscribe_keeps_last_posted_date_and_unpauses(store):
    store.subscribe(5, "08:00", "wujue")
    assert store.claim_daily_post(5, "2026-05-01")
    store.pause_subscription(5, "Forbidden")
    assert store.active_subscriptions() == []
    sub = store.subscribe(5, "09:00", None)
    assert (sub.time, sub.form, sub.paused, sub.last_posted_date) == ("09:00", None, False, "2026-05-01")


def test_claim_daily_post_succeeds_once_per_date(store):
    store.subscribe(5, "08:00", None)
    assert store.claim_daily_post(5, "2026-05-01")
    assert not store.claim_daily_post(5, "2026-05-01")
    assert not store.claim_daily_post(5, "2026-04-30")  # never moves backwards
    assert store.claim_daily_post(5, "2026-05-02")


def test_claim_daily_post_fails_for_paused_or_missing_subscriptions(store):
    assert not store.claim_daily_post(5, "2026-05-01")
    store.subscribe(5, "08:00", None)
    store.pause_subscription(5, "gone")
    assert not store.claim_daily_post(5, "2026-05-01")


def test_claim_daily_post_has_one_winner_across_connections(tmp_path, store):
    store.subscribe(5, "08:00", None)
    stores = [Store.open(tmp_path / "bot.db") for _ in range(8)]
    wins, barrier = [], threading.Barrier(len(stores))

    def race(s):
        barrier.wait()
        wins.append(s.claim_daily_post(5, "2026-05-01"))

    threads = [threading.Thread(target=race, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_release_daily_post_undoes_only_its_own_claim(store):
    store.subscribe(5, "08:00", None)
    store.claim_daily_post(5, "2026-05-01")
    store.release_daily_post(5, "2026-05-01", None)
    assert store.subscription(5).last_posted_date is None
    store.claim_daily_post(5, "2026-05-02")
    store.release_daily_post(5, "2026-05-01", None)  # stale: the claim has moved on
    assert store.subscription(5).last_posted_date == "2026-05-02"


def test_unsubscribe_reports_whether_there_was_one(store):
    assert not store.unsubscribe(5)
    store.subscribe(5, "08:00", None)
    assert store.unsubscribe(5) and store.subscription(5) is None


def test_poems_are_recorded_with_model_and_source(store):
    poem_id = store.record_poem(5, 7, "command", a_result(), prompt="月")
    row = store.poem(poem_id)
    assert (row["chat_id"], row["user_id"], row["source"], row["model"], row["model_version"]) == (5, 7, "command", "lstm", "v1")
    assert [p["id"] for p in store.recent_poems(5)] == [poem_id]


def test_poems_keep_their_keywords_beam_width_and_temperature_for_another_like_them(store):
    from bot.db import poem_keywords

    row = store.poem(store.record_poem(5, 7, "command", a_result(), prompt="月", keywords=["舟", "秋"], beam_width=3,
                                       temperature=0.9))
    assert (poem_keywords(row), row["beam_width"], row["temperature"], row["prompt"]) == (["舟", "秋"], 3, 0.9, "月")
    assert poem_keywords(store.poem(store.record_poem(5, 7, "command", a_result()))) == []


def test_the_card_setting_is_unset_until_chosen_and_then_kept(tmp_path, store):
    assert store.chat_settings(5).card is None  # the default: on in channels only (bot.commands.cards_on)
    assert store.update_chat_settings(5, card=True).card is True
    store.update_chat_settings(5, form="wulv")
    assert store.chat_settings(5) == ChatSettings(form="wulv", card=True)
    assert store.update_chat_settings(5, card=False).card is False


def test_a_version_2_database_is_migrated_for_cards_and_buttons(tmp_path):
    """A file from before /card and 🔁: its chats, poems and subscriptions keep working; the new columns
    start empty (card None = the default, no keywords, no chat type)."""
    import sqlite_utils

    from bot.db import MIGRATIONS, poem_keywords

    db = sqlite_utils.Database(tmp_path / "bot.db")
    for migration in MIGRATIONS[:2]:
        migration(db)
    db.execute("PRAGMA user_version = 2")
    db["chats"].insert({"chat_id": 7, "form": "wulv", "mode": "sample", "beam_width": 4, "temperature": 1.1})
    db["poems"].insert({"id": 1, "chat_id": 7, "source": "command", "prompt": "月", "form": "wulv", "mode": "sample",
                        "model": "lstm", "poem": "月山水花风，云春秋天人。江河日夜明，清白青长空。"})
    db["subscriptions"].insert({"chat_id": 7, "time": "08:00", "paused": 0, "created_at": "2026-04-01T00:00:00+00:00"})
    db.conn.commit()
    db.close()
    store = Store.open(tmp_path / "bot.db")
    assert store.schema_version() == SCHEMA_VERSION == 5
    assert store.chat_settings(7) == ChatSettings(form="wulv", mode="sample", beam_width=4, temperature=1.1, card=None)
    assert poem_keywords(store.poem(1)) == [] and store.poem(1)["beam_width"] is None and store.poem(1)["tune"] is None
    assert store.poem(1)["rhymes"] is None  # answered no poem: 🔁 writes a plain one again
    assert store.subscription(7).chat_type is None and store.subscription(7).tune is None
    store.update_chat_settings(7, card=True)
    assert store.subscribe(7, "09:00", None, chat_type="channel").chat_type == "channel"
    assert store.subscribe(7, "10:00", None).chat_type == "channel"  # kept when not given
    store.close()
    again = Store.open(tmp_path / "bot.db")
    assert again.chat_settings(7).card is True and again.subscription(7).time == "10:00"
    assert again.subscribe(7, "11:00", "ci", tune="浣溪沙").tune == "浣溪沙"
    again.close()


def test_feedback_one_vote_per_user_and_counts(store):
    poem_id = store.record_poem(5, 7, "command", a_result())
    store.record_feedback(poem_id, 1, 1)
    store.record_feedback(poem_id, 2, 1)
    store.record_feedback(poem_id, 2, -1)
    assert store.feedback_counts(poem_id) == (1, 1)
    with pytest.raises(ValueError):
        store.record_feedback(poem_id, 3, 5)


def test_counts_for_status(store):
    store.update_chat_settings(5, form="wulv")
    store.subscribe(5, "08:00", None)
    poem_id = store.record_poem(5, 7, "daily", a_result())
    store.record_feedback(poem_id, 1, -1)
    assert store.counts() == {"chats": 1, "subscriptions": 1, "paused_subscriptions": 0, "poems": 1, "likes": 0,
                              "dislikes": 1}


@pytest.mark.parametrize("start", ["new", "version 2"])
def test_two_processes_opening_one_file_together_migrate_it_once(tmp_path, start):
    """The bot and a console chat starting at once on a new or old file: both open it, neither fails."""
    import sqlite_utils

    from bot.db import MIGRATIONS

    for round_ in range(8):
        path = tmp_path / f"{round_}.db"
        if start == "version 2":
            db = sqlite_utils.Database(path)
            db.enable_wal()
            for migration in MIGRATIONS[:2]:
                migration(db)
            db.execute("PRAGMA user_version = 2")
            db.conn.commit()
            db.close()
        together, errors, stores = threading.Barrier(3), [], []

        def open_store():
            together.wait()
            try:
                stores.append(Store.open(path))
            except Exception as e:  # noqa: BLE001  NOTE: the test reports what each opener met
                errors.append(e)

        run_in_threads(open_store, 3)
        assert errors == [] and len(stores) == 3
        assert {s.schema_version() for s in stores} == {SCHEMA_VERSION}


def test_moving_a_chat_takes_its_settings_subscription_and_poems_but_never_overwrites_the_new_chats(store):
    from engine.api import PoemResult

    store.update_chat_settings(-1, form="wulv")
    store.subscribe(-1, "08:00", None)
    result = PoemResult(poem="月山水花风，云春秋天人。江河日夜明，清白青长空。", lines=[], form="wujue", mode="beam",
                        model={"name": "lstm", "version": "v"}, elapsed_ms=1.0)
    poem_id = store.record_poem(-1, 7, "command", result)
    assert store.move_chat(-1, -100)
    assert store.chat_settings(-100).form == "wulv" and store.subscription(-100).time == "08:00"
    assert store.poem(poem_id)["chat_id"] == -100
    assert store.subscription(-1) is None and store.chat_settings(-1) == ChatSettings()
    # The new chat already has settings of its own: they stay, and the old chat's go.
    store.update_chat_settings(-2, form="qilv")
    store.update_chat_settings(-200, form="wujue")
    assert not store.move_chat(-2, -200)
    assert store.chat_settings(-200).form == "wujue" and store.chat_settings(-2) == ChatSettings()
    assert not store.move_chat(-3, -300)  # nothing there
