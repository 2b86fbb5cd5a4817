"""The retrain daemon: APScheduler runs trainer.retrain on RETRAIN_CRON in TIMEZONE; the bot asks it for runs.

    python -m trainer schedule                 # daemon: CHECKPOINT_DIR, CORPUS_DIR, RETRAIN_CRON, TIMEZONE, …
    python -m trainer schedule --once [--force]  # one run now, then exit (prints the record)

One daemon per store: it holds an flock on CHECKPOINT_DIR/.trainer/daemon.lock, and a second one refuses
to start. The bot triggers a run through a spool of small files in the same directory rather than by
training in its own process: the trainer service has the corpus, the CPU/GPU budget and the run lock,
the bot process stays responsive, and the trigger works the same whether the bot runs beside the trainer
or in another container sharing the checkpoints volume.

    request_id = request_retrain(store, force=True, requested_by="tg:42")   # RetrainUnavailable if no daemon
    status = await wait_for_retrain(store, request_id, timeout=3600)         # {"state": "done", "record": {…}}
    summary(status["record"])                                                # "published 2026…, ppl 93.10 → 91.80"

The bot's /retrain calls `bot_retrain` (RETRAIN_HOOK=trainer.schedule:bot_retrain; `bot_retrain_force`
trains even when nothing changed), which does exactly that and answers with the summary line.

    .trainer/requests/<id>.json   queued (written by request_retrain)
    .trainer/results/<id>.json    {"state": "accepted" | "running" | "done", "record": … when done}
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import fcntl
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.checkpoint import atomic_write_bytes
from trainer.retrain import RetrainConfig, records_path, retrain, summary, trainer_dir

log = logging.getLogger("yinshi.schedule")

DEFAULT_CRON = "15 3 * * *"  # 03:15 every day: after midnight's corpus updates, before the morning traffic
DEFAULT_TIMEZONE = "Asia/Shanghai"
POLL_SECONDS = 2.0  # how often the daemon looks for requests from the bot
REQUEST_ID_RE = re.compile(r"^[0-9a-f]{32}$")
RESULTS_KEPT_DAYS = 7


class DaemonRunning(RuntimeError):
    """Another daemon holds the lock of this store."""


class RetrainUnavailable(RuntimeError):
    """No daemon serves this store, so a request would never be answered."""


# -- the daemon lock -------------------------------------------------------------------------------------
def _lock_path(store) -> Path:
    return trainer_dir(store) / "daemon.lock"


def acquire_daemon_lock(store):
    """Hold the store's daemon lock for as long as the returned file stays open; DaemonRunning if taken."""
    path = _lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise DaemonRunning(f"another trainer daemon is already running for {store} ({holder}; lock {path}); "
                            "refusing to start a second one") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} since {dt.datetime.now().isoformat(timespec='seconds')}\n")
    f.flush()
    return f


def daemon_running(store) -> bool:
    """Whether some process holds the store's daemon lock (taking it for a moment if it is free)."""
    path = _lock_path(store)
    if not path.exists():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


# -- requests from the bot -------------------------------------------------------------------------------
def _spool(store, kind: str) -> Path:
    return trainer_dir(store) / kind


def request_retrain(store, *, name: str = "lstm", force: bool = False, requested_by: str = "") -> str:
    """Queue a run for the store's daemon; returns the request id. Raises RetrainUnavailable without a daemon."""
    if not daemon_running(store):
        raise RetrainUnavailable(f"no trainer daemon is running for {store}: start `python -m trainer schedule`")
    request_id = uuid.uuid4().hex
    body = {"id": request_id, "name": name, "force": bool(force), "requested_by": str(requested_by),
            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_bytes(_spool(store, "requests") / f"{request_id}.json", json.dumps(body).encode())
    return request_id


def retrain_status(store, request_id: str) -> dict:
    """{"state": "queued" | "accepted" | "running" | "done" | "unknown", "record": {…} once done}."""
    if not REQUEST_ID_RE.match(request_id or ""):
        return {"state": "unknown"}
    result = _spool(store, "results") / f"{request_id}.json"
    try:
        return json.loads(result.read_text())
    except FileNotFoundError:
        pass
    except json.JSONDecodeError:
        return {"state": "unknown"}
    if (_spool(store, "requests") / f"{request_id}.json").exists():
        return {"state": "queued"}
    return {"state": "unknown"}


async def wait_for_retrain(store, request_id: str, timeout: float = 3600.0, poll: float = 2.0) -> dict:
    """Poll until the run is done or `timeout` passes; returns the last status (check its "state")."""
    deadline = time.monotonic() + timeout
    while True:
        status = retrain_status(store, request_id)
        if status["state"] in ("done", "unknown") or time.monotonic() >= deadline:
            return status
        await asyncio.sleep(min(poll, max(0.0, deadline - time.monotonic())))


async def bot_retrain(force: bool = False, timeout: float = 2 * 3600) -> str:
    """The bot's /retrain (RETRAIN_HOOK=trainer.schedule:bot_retrain): ask the daemon, wait, one line back."""
    store = os.environ.get("CHECKPOINT_DIR") or RetrainConfig.store
    request_id = request_retrain(store, name=os.environ.get("RETRAIN_NAME") or "lstm", force=force,
                                 requested_by="bot")
    status = await wait_for_retrain(store, request_id, timeout=timeout)
    if status["state"] != "done":
        return f"still {status['state']} after {timeout / 60:.0f} min; its record will be in {records_path(store)}"
    return summary(status["record"])


async def bot_retrain_force() -> str:
    """RETRAIN_HOOK=trainer.schedule:bot_retrain_force: the same, training even on an unchanged corpus."""
    return await bot_retrain(force=True)


def _write_result(store, request_id: str, status: dict) -> None:
    atomic_write_bytes(_spool(store, "results") / f"{request_id}.json",
                       json.dumps(status, ensure_ascii=False, default=str).encode())


def serve_request(cfg: RetrainConfig, request: dict) -> dict:
    """Run one requested retrain and store its outcome where retrain_status finds it."""
    _write_result(cfg.store, request["id"], {"state": "running", "request": request})
    run_cfg = replace(cfg, name=request.get("name") or cfg.name)
    record = retrain(run_cfg, force=request.get("force", False), reason=f"requested by {request['requested_by'] or 'bot'}",
                     wait=24 * 3600)
    _write_result(cfg.store, request["id"], {"state": "done", "request": request, "record": record})
    return record


def take_requests(cfg: RetrainConfig, submit) -> list[dict]:
    """Hand every queued request to `submit` (oldest first) and mark it accepted; returns them."""
    taken = []
    queue = _spool(cfg.store, "requests")
    for path in sorted(queue.glob("*.json"), key=lambda p: p.stat().st_mtime) if queue.is_dir() else []:
        try:
            request = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # still being written, or junk: looked at again next poll
        if not REQUEST_ID_RE.match(str(request.get("id", ""))) or path.stem != request["id"]:
            path.unlink(missing_ok=True)
            continue
        request.setdefault("requested_by", "")
        # Accepted before the request file goes, so a status read in between never sees "unknown".
        _write_result(cfg.store, request["id"], {"state": "accepted", "request": request})
        path.unlink(missing_ok=True)
        submit(request)
        taken.append(request)
    return taken


def fail_interrupted(store) -> int:
    """Close out requests a previous daemon accepted but never finished (it was killed); drop old results."""
    results = _spool(store, "results")
    count = 0
    for path in results.glob("*.json") if results.is_dir() else []:
        try:
            status = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            path.unlink(missing_ok=True)
            continue
        if status.get("state") in ("accepted", "running"):
            status.update(state="done", record={"outcome": "failed", "why": "the trainer daemon stopped before the run ended"})
            _write_result(store, path.stem, status)
            count += 1
        elif time.time() - path.stat().st_mtime > RESULTS_KEPT_DAYS * 86400:
            path.unlink(missing_ok=True)
    return count


# -- the scheduler ---------------------------------------------------------------------------------------
def build_scheduler(cfg: RetrainConfig, cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE,
                    scheduler_cls=None, trigger=None, poll_seconds: float = POLL_SECONDS):
    """A scheduler with the retrain job and the request poller; `trigger` replaces the cron one (tests)."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.blocking import BlockingScheduler
    from apscheduler.triggers.cron import CronTrigger

    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"TIMEZONE {timezone!r} is not an IANA time zone (e.g. Asia/Shanghai)") from None
    if trigger is None:
        try:
            trigger = CronTrigger.from_crontab(cron, timezone=tz)
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
        retrain, trigger, kwargs={"cfg": cfg, "reason": "schedule", "wait": 3600},
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

    def poll():
        take_requests(cfg, lambda request: scheduler.add_job(
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
    log.info("trainer daemon for %s: model %s, cron %r in %s (next run %s), budget %g min", cfg.store, cfg.name,
             cron, timezone, first.isoformat(timespec="minutes") if first else "never", cfg.time_budget)
    try:
        scheduler.start()  # blocks; logs the next run time
    except (KeyboardInterrupt, SystemExit):
        pass
    log.info("stopping; a run cut off now resumes from its run directory next time")
    scheduler.shutdown(wait=False)
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
    p.add_argument("--name", help=f"model name in the store (default {d.name})")
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
    return RetrainConfig.from_env(store=args.store, corpus=args.corpus, name=args.name, work=args.work,
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
    record = retrain(cfg, force=force, reason=reason)
    print(json.dumps(record, ensure_ascii=False, default=str))
    print(summary(record), file=sys.stderr)
    return 0 if record["outcome"] in ("published", "skipped", "rejected") else 1


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
