"""The retrain daemon: its lock, its scheduled job, and retrains requested by the bot through the spool."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from conftest import make_poems, write_corpus
from test_retrain import fake_poem, tiny_config

from trainer import retrain as rt
from trainer import daemon, spool
from trainer.retrain import read_run_records

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "_generate", fake_poem)
    corpus = write_corpus(tmp_path / "corpus", make_poems(200, seed=1))
    return tiny_config(tmp_path, corpus, max_steps=10)


def wait_until(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_second_daemon_is_refused_by_the_lock(cfg):
    lock = spool.acquire_daemon_lock(cfg.store)
    try:
        with pytest.raises(spool.DaemonRunning, match="already running"):
            spool.acquire_daemon_lock(cfg.store)
        proc = subprocess.run([sys.executable, "-m", "trainer", "schedule", "--store", cfg.store], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        assert "another trainer daemon is already running" in proc.stderr
        assert "refusing to start" in proc.stderr
    finally:
        lock.close()


def test_the_lock_is_free_again_once_the_daemon_is_gone(cfg):
    lock = spool.acquire_daemon_lock(cfg.store)
    assert spool.daemon_running(cfg.store)
    lock.close()
    assert not spool.daemon_running(cfg.store)
    spool.acquire_daemon_lock(cfg.store).close()


def test_the_retrain_job_is_set_to_run_once_at_a_time_coalesced_with_a_grace_time(cfg):
    scheduler = daemon.build_scheduler(cfg, "15 3 * * *", "Asia/Shanghai", scheduler_cls=BackgroundScheduler)
    job = scheduler.get_job("retrain")
    assert (job.max_instances, job.coalesce, job.misfire_grace_time) == (1, True, 3600)
    assert str(job.trigger.timezone) == "Asia/Shanghai"
    assert str(job.trigger) == "cron['15 3 * * *' on the wall clock of Asia/Shanghai]"
    # The known-lines table is brought up to date once, at start, on the retrain worker.
    table = scheduler.get_job("known-lines")
    assert table.executor == "default" and str(table.trigger).startswith("date")


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "America/Santiago", "Australia/Lord_Howe"])
@pytest.mark.parametrize("cron", ["15 0 * * *", "30 2 * * *", "0 1 * * *"])
def test_the_retrain_cron_fires_once_every_day_across_dst_changes(cfg, zone, cron):
    """APScheduler's CronTrigger skipped 30 March in Berlin at 00:15 (apscheduler#606) and fired twice at
    02:30 on 25 October."""
    from zoneinfo import ZoneInfo

    scheduler = daemon.build_scheduler(cfg, cron, zone, scheduler_cls=BackgroundScheduler)
    trigger, tz = scheduler.get_job("retrain").trigger, ZoneInfo(zone)
    fired, previous, now = [], None, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for _ in range(400):  # a year of days, and a bound: a trigger stuck on one time fails here, not hangs
        previous = trigger.get_next_fire_time(previous, now)
        fired.append(previous)
        now = max(now, previous) + dt.timedelta(seconds=1)
        if now >= dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc):
            break
    days = [f.astimezone(tz).date() for f in fired]
    assert all(b - a == dt.timedelta(days=1) for a, b in zip(days, days[1:]))  # every day once, none skipped
    assert all(b > a for a, b in zip(fired, fired[1:]))
    hour, minute = int(cron.split()[1]), int(cron.split()[0])
    assert all(f.astimezone(tz).time() >= dt.time(hour, minute) for f in fired)  # never before the time


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"])
def test_a_cron_of_every_half_hour_moves_forward_through_dst_changes(zone):
    """A time a change skips is the same instant as the one after the gap: one firing, never one earlier than
    the last (the first version went back from 03:30 to 03:00 in Berlin)."""
    from zoneinfo import ZoneInfo

    trigger, utc = daemon.wall_clock_cron("*/30 * * * *", ZoneInfo(zone)), dt.timezone.utc
    for day in (dt.datetime(2026, 3, 7, tzinfo=utc), dt.datetime(2026, 3, 28, tzinfo=utc),
                dt.datetime(2026, 4, 4, tzinfo=utc), dt.datetime(2026, 10, 3, tzinfo=utc),
                dt.datetime(2026, 10, 24, tzinfo=utc), dt.datetime(2026, 10, 31, tzinfo=utc)):
        fired, previous = [], None
        for _ in range(4 * 48):
            previous = trigger.get_next_fire_time(previous, previous + dt.timedelta(seconds=1) if previous else day)
            fired.append(previous.astimezone(utc))
        assert all(b > a for a, b in zip(fired, fired[1:])), zone
        assert max(b - a for a, b in zip(fired, fired[1:])) <= dt.timedelta(hours=2)  # a repeated hour fires once


def test_a_daemon_started_in_a_repeated_hour_does_not_fire_its_first_pass_again():
    from zoneinfo import ZoneInfo

    tz = ZoneInfo("Europe/Berlin")
    trigger = daemon.wall_clock_cron("30 2 * * *", tz)
    second_pass = dt.datetime(2026, 10, 25, 2, 10, tzinfo=tz, fold=1)  # 02:30 came an hour ago, first time round
    assert trigger.get_next_fire_time(None, second_pass) == dt.datetime(2026, 10, 26, 2, 30, tzinfo=tz)


@pytest.mark.parametrize("cron, weekdays", [("0 3 * * 0", {"Sun"}), ("0 3 * * 7", {"Sun"}),
                                            ("0 3 * * 1-5", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
                                            ("0 3 * * */2", {"Sun", "Tue", "Thu", "Sat"}),
                                            ("0 3 * * sat,sun", {"Sat", "Sun"})])
def test_cron_weekdays_count_from_sunday_as_crontab_does(cfg, cron, weekdays):
    # APScheduler's from_crontab counts from Monday: "0 3 * * 0" ran on Mondays.
    scheduler = daemon.build_scheduler(cfg, cron, "Asia/Shanghai", scheduler_cls=BackgroundScheduler)
    trigger, previous, fired = scheduler.get_job("retrain").trigger, None, set()
    for _ in range(21):
        previous = trigger.get_next_fire_time(previous, dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc))
        fired.add(previous.strftime("%a"))
    assert fired == weekdays


@pytest.mark.parametrize("cron", ["0 3 1 * 1", "0 3 * * 8", "0 3 * * 5-2"])
def test_a_cron_whose_days_crontab_and_apscheduler_would_read_apart_is_refused(cfg, cron):
    with pytest.raises(ValueError, match="RETRAIN_CRON"):
        daemon.build_scheduler(cfg, cron, "Asia/Shanghai", scheduler_cls=BackgroundScheduler)


@pytest.mark.parametrize("cron, zone, message", [("every night", "Asia/Shanghai", "RETRAIN_CRON"),
                                                 ("15 3 * * *", "Mars/Olympus", "TIMEZONE")])
def test_a_bad_cron_expression_or_time_zone_is_a_clear_error(cfg, cron, zone, message):
    with pytest.raises(ValueError, match=message):
        daemon.build_scheduler(cfg, cron, zone, scheduler_cls=BackgroundScheduler)


def test_the_scheduled_job_fires_and_runs_a_retrain(cfg):
    scheduler = daemon.build_scheduler(cfg, scheduler_cls=BackgroundScheduler, trigger=IntervalTrigger(seconds=1))
    scheduler.start()
    try:
        assert wait_until(lambda: len(read_run_records(cfg.store)) >= 2), read_run_records(cfg.store)
    finally:
        scheduler.shutdown(wait=True)
    records = read_run_records(cfg.store)
    assert records[0]["reason"] == "schedule"
    assert records[0]["outcome"] == "published", records[0]
    assert records[1]["outcome"] == "skipped"  # the next firing: nothing changed since


def test_request_retrain_without_a_daemon_is_refused(cfg):
    with pytest.raises(spool.RetrainUnavailable, match="python -m trainer schedule"):
        spool.request_retrain(cfg.store)


def test_a_bot_request_is_run_by_the_daemon_and_its_outcome_reported(cfg):
    lock = spool.acquire_daemon_lock(cfg.store)  # this process plays the daemon
    scheduler = daemon.build_scheduler(cfg, scheduler_cls=BackgroundScheduler, trigger=IntervalTrigger(days=1),
                                         poll_seconds=0.2)
    scheduler.start()
    try:
        request_id = spool.request_retrain(cfg.store, force=True, requested_by="tg:42")
        assert spool.retrain_status(cfg.store, request_id)["state"] in ("queued", "accepted", "running")
        status = asyncio.run(spool.wait_for_retrain(cfg.store, request_id, timeout=60, poll=0.1))
    finally:
        scheduler.shutdown(wait=True)
        lock.close()
    assert status["state"] == "done"
    assert status["record"]["outcome"] == "published"
    assert status["record"]["reason"] == "requested by tg:42"
    assert spool.summary(status["record"]).startswith("published ")
    assert read_run_records(cfg.store)[-1]["version"] == status["record"]["version"]


def test_the_bot_hook_asks_the_daemon_and_answers_with_one_line(cfg, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_DIR", cfg.store)
    cfg.names = ("gru", "lstm")  # the bot's /retrain retrains what serves, like the schedule
    lock = spool.acquire_daemon_lock(cfg.store)
    scheduler = daemon.build_scheduler(cfg, scheduler_cls=BackgroundScheduler, trigger=IntervalTrigger(days=1),
                                         poll_seconds=0.2)
    scheduler.start()
    try:
        first = asyncio.run(spool.bot_retrain())
        second = asyncio.run(spool.bot_retrain())
    finally:
        scheduler.shutdown(wait=True)
        lock.close()
    assert first.startswith("gru: published ") and "; lstm: published " in first and "\n" not in first
    assert second.startswith("gru: skipped, corpus and code unchanged") and "; lstm: skipped" in second
    assert [r["name"] for r in read_run_records(cfg.store)] == ["gru", "lstm", "gru", "lstm"]


def test_waiting_for_a_request_times_out_without_losing_it(cfg):
    lock = spool.acquire_daemon_lock(cfg.store)
    try:
        request_id = spool.request_retrain(cfg.store)
        status = asyncio.run(spool.wait_for_retrain(cfg.store, request_id, timeout=0.2, poll=0.05))
    finally:
        lock.close()
    assert status == {"state": "queued"}


def test_requests_cut_off_by_a_stopped_daemon_are_reported_as_failed(cfg):
    lock = spool.acquire_daemon_lock(cfg.store)
    try:
        request_id = spool.request_retrain(cfg.store)
        spool.take_requests(cfg.store, submit=lambda request: None)  # accepted, then the daemon dies
    finally:
        lock.close()
    assert spool.retrain_status(cfg.store, request_id)["state"] == "accepted"
    assert spool.fail_interrupted(cfg.store) == 1
    status = spool.retrain_status(cfg.store, request_id)
    assert status["state"] == "done" and status["record"]["outcome"] == "failed"


@pytest.mark.parametrize("request_id", ["", "../../etc/passwd", "x" * 32])
def test_an_unknown_or_malformed_request_id_reads_as_unknown(cfg, request_id):
    assert spool.retrain_status(cfg.store, request_id) == {"state": "unknown"}


def test_schedule_once_runs_one_retrain_and_prints_its_record(cfg, capsys):
    assert daemon.run_once(cfg, force=False, reason="once") == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["outcome"] == "published" and record["reason"] == "once"


def test_command_line_flags_and_the_environment_reach_the_retrain_config(monkeypatch):
    from trainer.__main__ import build_parser

    monkeypatch.setenv("CHECKPOINT_DIR", "/srv/checkpoints")
    monkeypatch.setenv("CORPUS_DIR", "/srv/corpus")
    monkeypatch.setenv("RETRAIN_TIME_BUDGET", "7.5")
    monkeypatch.setenv("RETRAIN_CRON", "0 4 * * 1")
    monkeypatch.setenv("ENGINE_MODELS", " lstm , gru ")
    monkeypatch.setenv("RETRAIN_NAME", "nope")  # gone: ENGINE_MODELS says what serves, so what retrains
    assert daemon.config_from_args(build_parser().parse_args(["retrain"])).names == ("lstm", "gru")
    args = build_parser().parse_args(["schedule", "--once", "--keep", "3", "--name", "gru"])
    cfg = daemon.config_from_args(args)
    assert (cfg.store, cfg.corpus, cfg.time_budget, cfg.keep, cfg.names) == (
        "/srv/checkpoints", ["/srv/corpus"], 7.5, 3, ("gru",))
    assert args.cron == "0 4 * * 1" and args.once
    args = build_parser().parse_args(["retrain", "--corpus", "a", "b", "--time-budget", "1", "--force"])
    cfg = daemon.config_from_args(args)
    assert (cfg.corpus, cfg.time_budget, args.force) == (["a", "b"], 1.0, True)


def test_the_default_names_are_the_engines(monkeypatch):
    from engine.serving.local import EngineSettings
    from trainer.retrain import RetrainConfig

    monkeypatch.delenv("ENGINE_MODELS", raising=False)
    assert RetrainConfig.from_env().names == EngineSettings().model_names  # the default model first


def test_a_scheduled_run_retrains_every_served_model_the_default_first(cfg):
    # The engine serves ENGINE_MODELS, the default (gru) first; retraining only "lstm" left it untouched.
    cfg.names = ("gru", "lstm")
    scheduler = daemon.build_scheduler(cfg, scheduler_cls=BackgroundScheduler, trigger=IntervalTrigger(days=1))
    scheduler.start()
    try:
        scheduler.get_job("retrain").modify(next_run_time=dt.datetime.now(dt.timezone.utc))  # fire now
        assert wait_until(lambda: len(read_run_records(cfg.store)) >= 2), read_run_records(cfg.store)
    finally:
        scheduler.shutdown(wait=True)
    records = read_run_records(cfg.store)
    assert [(r["name"], r["outcome"], r["reason"]) for r in records] == [("gru", "published", "schedule"),
                                                                       ("lstm", "published", "schedule")]
    from engine.model import versions as store
    from engine.model.checkpoint import load_checkpoint

    assert store.model_names(cfg.store) == ["gru", "lstm"]
    assert load_checkpoint(store.current_path(cfg.store, "gru")).model.config.cell == "gru"
    assert load_checkpoint(store.current_path(cfg.store, "lstm")).model.config.cell == "lstm"


def _junk(queue: Path, kind: str) -> Path:
    """A file in a spool folder that is not a request: what a crash, a typo or another user could leave."""
    import os

    path = queue / f"{kind}.json"
    if kind == "list":
        path.write_text("[]")
    elif kind == "fifo":
        os.mkfifo(path)  # reading it would block the daemon's poller for good
    elif kind == "link":
        (queue.parent / "elsewhere.json").write_text(json.dumps({"id": "0" * 32}))
        path.symlink_to(queue.parent / "elsewhere.json")
    elif kind == "huge":
        path.write_text(json.dumps({"id": "x" * 200_000}))
    elif kind == "latin1":
        path.write_bytes('{"id": "é"}'.encode("latin-1"))
    elif kind == "deep":
        path.write_text("[" * 100_000)
    return path


@pytest.mark.parametrize("kind", ["list", "fifo", "link", "huge", "latin1", "deep"])
def test_a_junk_file_in_the_spool_is_set_aside_and_the_requests_behind_it_still_run(cfg, kind):
    """A `[]` raised on every poll before the newer requests were reached, and a FIFO blocked the poller."""
    import os

    lock = spool.acquire_daemon_lock(cfg.store)
    try:
        queue = spool.trainer_dir(cfg.store) / "requests"
        queue.mkdir(parents=True, exist_ok=True)
        junk = _junk(queue, kind)
        os.utime(junk, (0, 0), follow_symlinks=False)  # the oldest: looked at first
        request_id = spool.request_retrain(cfg.store)
        taken = []
        for _ in range(2):  # two polls: the junk does not come back
            taken += spool.take_requests(cfg.store, submit=lambda request: None)
    finally:
        lock.close()
    assert [r["id"] for r in taken] == [request_id]
    assert not junk.exists() and not junk.is_symlink() and junk.with_suffix(".rejected").exists()
    assert spool.retrain_status(cfg.store, request_id)["state"] == "accepted"


@pytest.mark.parametrize("kind", ["list", "fifo", "link", "huge", "latin1", "deep"])
def test_a_junk_results_file_reads_as_unknown_and_does_not_stop_the_daemon_starting(cfg, kind):
    results = spool.trainer_dir(cfg.store) / "results"
    results.mkdir(parents=True, exist_ok=True)
    junk = _junk(results, kind)
    request_id = "a" * 32
    junk.rename(results / f"{request_id}.json")
    assert spool.retrain_status(cfg.store, request_id) == {"state": "unknown"}
    assert spool.fail_interrupted(cfg.store) == 0  # what the daemon runs first: it used to raise here
    assert spool.retrain_status(cfg.store, request_id) == {"state": "unknown"}


def test_a_requested_run_that_raises_is_reported_done_and_failed_not_running_for_hours(cfg, monkeypatch):
    def broken(*args, **kwargs):
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(daemon, "retrain_all", broken)
    request = {"id": "b" * 32, "name": None, "force": False, "requested_by": "tg:1"}
    records = daemon.serve_request(cfg, request)
    status = spool.retrain_status(cfg.store, request["id"])
    assert status["state"] == "done" and status["record"]["outcome"] == "failed"
    assert "UnicodeEncodeError" in status["record"]["why"] and records == status["records"]


def test_a_daemon_starting_while_the_bot_probes_the_lock_still_starts(cfg):
    """`daemon_running` takes the lock for an instant; a daemon starting in that instant refused to start."""
    import fcntl
    import threading

    path = spool.trainer_dir(cfg.store) / "daemon.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = open(path, "a")
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the probe holds it as the daemon starts
    release = threading.Timer(0.3, probe.close)
    release.start()
    try:
        lock = spool.acquire_daemon_lock(cfg.store)
    finally:
        release.join()
    assert spool.daemon_running(cfg.store)
    lock.close()
