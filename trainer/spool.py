"""The retrain spool: how the bot asks the trainer daemon for a run, without torch in the bot's process.

The bot triggers a run through small files in CHECKPOINT_DIR/.trainer rather than by training in its own
process: the trainer service has the corpus, the CPU/GPU budget and the run lock, the bot process stays
responsive, and the trigger works the same whether the bot runs beside the trainer or in another
container sharing the checkpoints volume. One daemon per store holds an flock on .trainer/daemon.lock.

    request_id = request_retrain(store, force=True, requested_by="tg:42")   # RetrainUnavailable if no daemon
    status = await wait_for_retrain(store, request_id, timeout=3600)         # {"state": "done", "record": {…}}
    summary(status["record"])                                                # "published 2026…, ppl 93.10 → 91.80"

The bot's /retrain calls `bot_retrain` (RETRAIN_HOOK=trainer.spool:bot_retrain; `bot_retrain_force`
trains even when nothing changed), which does exactly that and answers with the summary line.

    .trainer/requests/<id>.json   queued (written by request_retrain)
    .trainer/results/<id>.json    {"state": "accepted" | "running" | "done", "record": … when done}
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

from engine.files import atomic_write_bytes, read_regular_file

log = logging.getLogger(__name__)

DEFAULT_STORE = "var/checkpoints"  # CHECKPOINT_DIR's default
REQUEST_ID_RE = re.compile(r"^[0-9a-f]{32}$")
RESULTS_KEPT_DAYS = 7


def trainer_dir(store) -> Path:
    """CHECKPOINT_DIR/.trainer: records, locks and the request spool (the dot keeps it out of model_names)."""
    return Path(store) / ".trainer"


def records_path(store) -> Path:
    return trainer_dir(store) / "runs.jsonl"


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
    # NOTE: tried for a moment: the bot's `daemon_running` holds the lock for an instant when it probes.
    deadline = time.monotonic() + 2.0
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
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


def request_retrain(store, *, name: str | None = None, force: bool = False, requested_by: str = "") -> str:
    """Queue a run for the store's daemon (of `name`, None: every model it retrains); returns the request id.
    Raises RetrainUnavailable without a daemon."""
    if not daemon_running(store):
        raise RetrainUnavailable(f"no trainer daemon is running for {store}: start `python -m trainer schedule`")
    request_id = uuid.uuid4().hex
    body = {"id": request_id, "name": name or None, "force": bool(force), "requested_by": str(requested_by),
            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_bytes(_spool(store, "requests") / f"{request_id}.json", json.dumps(body).encode())
    return request_id


def retrain_status(store, request_id: str) -> dict:
    """{"state": "queued" | "accepted" | "running" | "done" | "unknown", "record": {…} once done}."""
    if not REQUEST_ID_RE.match(request_id or ""):
        return {"state": "unknown"}
    result = _spool(store, "results") / f"{request_id}.json"
    try:
        status = _read_spool_file(result)
        return status if isinstance(status.get("state"), str) else {"state": "unknown"}
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
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
    """The bot's /retrain (RETRAIN_HOOK=trainer.spool:bot_retrain): ask the daemon, wait, one line back.

    No model name: the daemon retrains every model the engine serves (its ENGINE_MODELS), the default first.
    """
    store = os.environ.get("CHECKPOINT_DIR") or DEFAULT_STORE
    request_id = request_retrain(store, force=force, requested_by="bot")
    status = await wait_for_retrain(store, request_id, timeout=timeout)
    if status["state"] != "done":
        return f"still {status['state']} after {timeout / 60:.0f} min; its record will be in {records_path(store)}"
    records = status.get("records") or [status["record"]]
    return "; ".join(f"{r['name']}: {summary(r)}" if r.get("name") else summary(r) for r in records)


async def bot_retrain_force() -> str:
    """RETRAIN_HOOK=trainer.spool:bot_retrain_force: the same, training even on an unchanged corpus."""
    return await bot_retrain(force=True)


MAX_SPOOL_BYTES = 64 * 1024  # a request or a result is a few hundred bytes


def _read_spool_file(path: Path) -> dict:
    """A spool file's JSON object. FileNotFoundError when it is gone; another OSError or ValueError for anything
    else: not a regular file (a FIFO would block the daemon, a link may point anywhere), too large, not UTF-8
    JSON, or not an object."""
    data = read_regular_file(path, MAX_SPOOL_BYTES, follow_links=False)
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path.name}: not JSON ({str(e)[:80]})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path.name}: not a JSON object")
    return value


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def write_result(store, request_id: str, status: dict) -> None:
    atomic_write_bytes(_spool(store, "results") / f"{request_id}.json",
                       json.dumps(status, ensure_ascii=False, default=str).encode())


def take_requests(store, submit) -> list[dict]:
    """Hand every queued request to `submit` (oldest first) and mark it accepted; returns them."""
    taken = []
    queue = _spool(store, "requests")
    for path in sorted(queue.glob("*.json"), key=_mtime) if queue.is_dir() else []:
        # NOTE: requests are written whole (atomic rename), so a file that does not read is junk, not half
        # written: it is set aside, or it would stop every later request behind it on every poll.
        try:
            request = _read_spool_file(path)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            log.warning("retrain spool: setting aside %s (%s)", path, e)
            with contextlib.suppress(OSError):
                path.rename(path.with_suffix(".rejected"))
            continue
        if not REQUEST_ID_RE.match(str(request.get("id", ""))) or path.stem != request["id"]:
            path.unlink(missing_ok=True)
            continue
        request.setdefault("requested_by", "")
        # Accepted before the request file goes, so a status read in between never sees "unknown".
        write_result(store, request["id"], {"state": "accepted", "request": request})
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
            status = _read_spool_file(path)
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            continue
        if status.get("state") in ("accepted", "running"):
            status.update(state="done", record={"outcome": "failed", "why": "the trainer daemon stopped before the run ended"})
            write_result(store, path.stem, status)
            count += 1
        elif time.time() - _mtime(path) > RESULTS_KEPT_DAYS * 86400:
            path.unlink(missing_ok=True)
    return count


def summary(record: dict) -> str:
    """One line for people (the bot's /retrain reply, the CLI's stderr)."""
    outcome = record.get("outcome", "unknown")
    metrics = record.get("metrics") or {}
    ppl = ""
    if "candidate" in metrics:
        ppl = f"ppl {metrics['candidate']['ppl']:.2f}"
        if "serving" in metrics:
            ppl = f"ppl {metrics['serving']['ppl']:.2f} → {metrics['candidate']['ppl']:.2f}"
    head = f"{outcome} {record['version']}" if record.get("version") else outcome
    return ", ".join(x for x in (head, ppl, record.get("why", "") if outcome != "published" else "") if x)
