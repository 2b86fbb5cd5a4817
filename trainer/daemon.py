"""The retrain daemon: APScheduler runs trainer.retrain on RETRAIN_CRON in TIMEZONE; the bot asks it for runs.

    python -m trainer schedule                 # daemon: CHECKPOINT_DIR, CORPUS_DIR, ENGINE_MODELS, RETRAIN_CRON, …
    python -m trainer schedule --once [--force]  # one run now, then exit (prints the record)

One daemon per store: it holds an flock on CHECKPOINT_DIR/.trainer/daemon.lock, and a second one refuses
to start. Every POLL_SECONDS it takes the bot's requests from the spool (trainer.spool) and runs them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import signal
import sys
from dataclasses import replace
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from trainer.retrain import RetrainConfig, prepare_corpus, retrain_all, stop_training
from trainer.spool import (
    DaemonRunning,
    acquire_daemon_lock,
    fail_interrupted,
    summary,
    take_requests,
    write_result,
)

log = logging.getLogger("yinshi.schedule")

DEFAULT_CRON = "15 3 * * *"  # 03:15 every day: after midnight's corpus updates, before the morning traffic
DEFAULT_TIMEZONE = "Asia/Shanghai"
POLL_SECONDS = 2.0  # how often the daemon looks for requests from the bot


def serve_request(cfg: RetrainConfig, request: dict) -> list[dict]:
    """Run one requested retrain (its model, or every served one) and store the outcome where retrain_status finds it."""
    write_result(cfg.store, request["id"], {"state": "running", "request": request})
    run_cfg = replace(cfg, names=(request["name"],)) if request.get("name") else cfg
    try:
        records = retrain_all(run_cfg, force=request.get("force", False),
                              reason=f"requested by {request['requested_by'] or 'bot'}", wait=24 * 3600)
    except Exception as e:  # a bug: the bot must still hear that the run ended, not wait hours on "running"
        log.exception("requested retrain failed")
        records = [{"outcome": "failed", "why": f"{type(e).__name__}: {e}"}]
    # "record": the default model's, for readers of one record; "records": one per model, in order.
    write_result(cfg.store, request["id"], {"state": "done", "request": request, "record": records[0],
                                            "records": records})
    return records


# -- the scheduler ---------------------------------------------------------------------------------------
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def crontab_days(expr: str) -> str:
    """A crontab expression with its day-of-week numbers as names: crontab counts from Sunday (0 or 7),
    APScheduler's from_crontab from Monday, so "0 3 * * 0" would run on Mondays. ValueError where the two
    cannot agree: both days restricted (crontab runs on either, APScheduler only on both)."""
    fields = expr.split()
    if len(fields) != 5:
        return expr  # from_crontab says what is wrong
    day, weekday = fields[2], fields[4]
    if day != "*" and weekday != "*":
        raise ValueError(f"it restricts both the day of the month ({day}) and of the week ({weekday}), which "
                         f"crontab reads as either and APScheduler as both: restrict one")
    days: list[str] = []
    for part in weekday.split(","):
        base, _, step = part.partition("/")
        if base != "*" and not base.replace("-", "").isdigit():
            days.append(part)  # names: the same in both
            continue
        lo, _, hi = base.partition("-") if base != "*" else ("0", "", "6")
        first, last = int(lo), int(hi or (6 if step else lo))
        if not (0 <= first <= 7 and 0 <= last <= 7 and first <= last):
            raise ValueError(f"day of the week {part!r} is not a range within 0-7 (0 and 7: Sunday)")
        days += [WEEKDAYS[n % 7] for n in range(first, last + 1, int(step or 1))]
    fields[4] = ",".join(dict.fromkeys(days)) if weekday != "*" else "*"
    return " ".join(fields)


def wall_clock_cron(expr: str, tz: ZoneInfo):
    """RETRAIN_CRON in TIMEZONE as an APScheduler trigger that steps the calendar on the wall clock and only
    then places the time in the zone. NOTE: APScheduler's own CronTrigger in a zone with daylight saving time
    skips the day after a spring-forward change for times soon after midnight (apscheduler#606) and fires twice
    in a repeated hour. Here a time the change skips fires an hour later on the clock (02:30 → 03:30), and a
    repeated one once, at its first occurrence. ValueError for an expression that is not a crontab."""
    from apscheduler.triggers.base import BaseTrigger
    from apscheduler.triggers.cron import CronTrigger

    utc = dt.timezone.utc
    wall = CronTrigger.from_crontab(crontab_days(expr), timezone=utc)  # wall-clock times, carried as UTC

    def on_wall(t: dt.datetime) -> dt.datetime:
        # NOTE: through UTC: astimezone(tz) leaves a datetime already in tz alone, even one a change skipped.
        return t.astimezone(utc).astimezone(tz).replace(tzinfo=utc, fold=0)

    class WallClockCron(BaseTrigger):
        timezone = tz

        def get_next_fire_time(self, previous_fire_time, now):
            # After the previous firing (a missed one may lie before now: the scheduler's misfire rules
            # decide), else at or after now. Compared as instants: datetimes of one tzinfo compare by wall clock.
            after = previous_fire_time.astimezone(utc) if previous_fire_time is not None else None
            candidate = wall.get_next_fire_time(after and on_wall(after), on_wall(now))
            while candidate is not None:
                instant = candidate.replace(tzinfo=tz, fold=0)  # the first of a repeated time, after a skipped one
                at = instant.astimezone(utc)
                if (at > after) if after is not None else (at >= now.astimezone(utc)):
                    return instant
                candidate = wall.get_next_fire_time(candidate, candidate)  # behind, in a repeated hour: the next
            return None

        def __str__(self):
            return f"cron[{expr!r} on the wall clock of {tz.key}]"

    return WallClockCron()


def build_scheduler(cfg: RetrainConfig, cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE,
                    scheduler_cls=None, trigger=None, poll_seconds: float = POLL_SECONDS):
    """A scheduler with the retrain job and the request poller; `trigger` replaces the cron one (tests)."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.blocking import BlockingScheduler

    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"TIMEZONE {timezone!r} is not an IANA time zone (e.g. Asia/Shanghai)") from None
    if trigger is None:
        try:
            trigger = wall_clock_cron(cron, tz)
        except ValueError as e:
            raise ValueError(f"RETRAIN_CRON {cron!r} is not a crontab expression (minute hour day month weekday): {e}") from None
    scheduler = (scheduler_cls or BlockingScheduler)(
        timezone=tz,
        # One worker for retrains: the scheduled run and bot requests queue behind each other in this
        # process instead of fighting for the same cores and run directory. The poller has its own
        # worker so it never waits behind a run that takes the whole time budget.
        executors={"default": ThreadPoolExecutor(1), "poll": ThreadPoolExecutor(1)},
    )
    scheduler.add_job(
        retrain_all, trigger, kwargs={"cfg": cfg, "reason": "schedule", "wait": 3600},
        id="retrain", name="scheduled retrain",
        # max_instances=1: a run that overruns the interval to the next firing must not start a second,
        # concurrent run on the same store (the run lock would refuse it anyway; this avoids the noise).
        max_instances=1,
        # coalesce: after downtime (a stopped daemon, a suspended machine) the firings that were missed
        # collapse into one run — retraining five times in a row on the same corpus buys nothing.
        coalesce=True,
        # misfire_grace_time: a run that could not start on time (daemon restarting, the previous run
        # still going) still runs within an hour; later than that it waits for the next firing rather than
        # training at peak hours, when the engine needs the CPU.
        misfire_grace_time=3600,
        replace_existing=True,
    )

    # The corpus and its known-lines table once at start, so that a fresh install gets both without waiting
    # for the first retrain (on the retrain worker: it reads the whole corpus, as a retrain does).
    scheduler.add_job(prepare_corpus, "date", args=[cfg], id="known-lines",
                      name="corpus and known-lines table", misfire_grace_time=None)

    def poll():
        take_requests(cfg.store, lambda request: scheduler.add_job(
            serve_request, "date", args=[cfg, request], id=f"request-{request['id']}",
            name=f"requested retrain {request['id'][:8]}", misfire_grace_time=None))

    # The poller is quick and idempotent: coalesce and one instance, and a missed poll is simply the next.
    scheduler.add_job(poll, "interval", seconds=poll_seconds, id="poll", name="request poller",
                      executor="poll", max_instances=1, coalesce=True, misfire_grace_time=None)
    return scheduler


def run_daemon(cfg: RetrainConfig, cron: str, timezone: str) -> int:
    try:
        lock = acquire_daemon_lock(cfg.store)
    except DaemonRunning as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    scheduler = build_scheduler(cfg, cron, timezone)
    interrupted = fail_interrupted(cfg.store)
    if interrupted:
        log.warning("%d request(s) were cut off by the previous daemon's exit; marked failed", interrupted)

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    trigger = scheduler.get_job("retrain").trigger
    first = trigger.get_next_fire_time(None, dt.datetime.now(trigger.timezone))
    log.info("trainer daemon for %s: models %s, cron %r in %s (next run %s), budget %g min", cfg.store,
             ",".join(cfg.names),
             cron, timezone, first.isoformat(timespec="minutes") if first else "never", cfg.time_budget)
    try:
        scheduler.start()  # blocks; logs the next run time
    except (KeyboardInterrupt, SystemExit):
        pass
    log.info("stopping; a run cut off now resumes from its run directory next time")
    scheduler.shutdown(wait=False)
    stop_training()
    lock.close()
    logging.shutdown()
    # A retrain thread may still be training; it holds no state that a kill would break (the run
    # directory resumes, publishing is atomic), so exit now instead of waiting out the time budget.
    os._exit(0)


# -- command line ----------------------------------------------------------------------------------------
def add_retrain_arguments(p: argparse.ArgumentParser):
    """Flags shared by `retrain` and `schedule`; each defaults to its environment variable."""
    d = RetrainConfig()
    p.add_argument("--store", help=f"checkpoint store (CHECKPOINT_DIR, default {d.store})")
    p.add_argument("--corpus", nargs="+", help=f"corpus directories or files (CORPUS_DIR, default {d.corpus[0]})")
    p.add_argument("--name", help=f"retrain only this model (default: each in ENGINE_MODELS, the default first: "
                                  f"{','.join(d.names)})")
    p.add_argument("--work", help=f"run directories, resumable (default {d.work})")
    p.add_argument("--time-budget", type=float, help=f"minutes of training (RETRAIN_TIME_BUDGET, default {d.time_budget:g})")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (default: the budget decides)")
    p.add_argument("--tolerance", type=float, help=f"publish when ppl <= serving ppl × (1 + this) (default {d.tolerance})")
    p.add_argument("--keep", type=int, help=f"versions kept in the store (default {d.keep})")
    p.add_argument("--base", help="start point while the store is empty: 'package' (the shipped default), a path, or ''")
    p.add_argument("--device", help="auto | cpu | cuda (DEVICE, default auto)")
    p.add_argument("--force", action="store_true", help="train even when the corpus and code are unchanged "
                   "(schedule: with --once)")


def config_from_args(args) -> RetrainConfig:
    return RetrainConfig.from_env(store=args.store, corpus=args.corpus, names=(args.name,) if args.name else None,
                                  work=args.work,
                                  time_budget=args.time_budget, max_steps=args.max_steps, tolerance=args.tolerance,
                                  keep=args.keep, base=args.base, device=args.device)


def add_arguments(p: argparse.ArgumentParser):
    add_retrain_arguments(p)
    p.add_argument("--cron", default=os.environ.get("RETRAIN_CRON") or DEFAULT_CRON,
                   help=f"crontab expression (RETRAIN_CRON, default {DEFAULT_CRON!r})")
    p.add_argument("--timezone", default=os.environ.get("TIMEZONE") or DEFAULT_TIMEZONE,
                   help=f"IANA time zone of the cron expression (TIMEZONE, default {DEFAULT_TIMEZONE})")
    p.add_argument("--once", action="store_true", help="run one retrain now and exit")


def run_once(cfg: RetrainConfig, force: bool, reason: str) -> int:
    """One run per model in cfg.names; one JSON record per line on stdout."""
    records = retrain_all(cfg, force=force, reason=reason)
    for record in records:
        print(json.dumps(record, ensure_ascii=False, default=str))
        print(f"{record['name']}: {summary(record)}", file=sys.stderr)
    ok = ("published", "skipped", "rejected", "superseded")
    return 0 if all(r["outcome"] in ok for r in records) else 1


def setup_logging():
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The request poller runs every POLL_SECONDS; at INFO apscheduler would log each of its runs.
    logging.getLogger("apscheduler.executors.poll").setLevel(logging.WARNING)


def main(args) -> int:
    setup_logging()
    cfg = config_from_args(args)
    if args.once:
        return run_once(cfg, args.force, "once")
    return run_daemon(cfg, args.cron, args.timezone)


def retrain_main(args) -> int:
    """`python -m trainer retrain [--force]`: one run now, its record on stdout."""
    setup_logging()
    return run_once(config_from_args(args), args.force, "command line")
