"""The checkpoint store: published versions per model name and a pointer to the one serving.

    CHECKPOINT_DIR/
      lstm/
        versions/20261126T221500123Z.safetensors
        versions/20261127T031500456Z.safetensors
        versions/20261127T031500456Z.gate.json   ← the trainer's gate verdict (retrain publishes only)
        CURRENT            ← "20261127T031500456Z\n" ("…\nrollback\n" after a rollback), replaced atomically

Publishing copies the checkpoint into `versions/` under a temporary name, fsyncs, fully validates the
copy (the bytes that will be served, not the source), renames, fsyncs the directory, then replaces
CURRENT. A kill at any moment leaves CURRENT naming a complete version (the old or the new), never half
of one. Writers (publish, rollback, prune) hold an flock on `<name>/.lock`, so two publishers never
interleave and the temporary files a writer finds under the lock are leftovers of a killed one. The
engine reads this layout without locking; the trainer writes it.

`publish(..., expect=v)` is a compare-and-swap: it changes nothing and raises Superseded unless CURRENT
still names `v` (a retrain passes the version it started from, so a hand publish or rollback made while it
trained is not overwritten). `rollback` marks CURRENT as a rollback in the same atomic write, so the
engine knows the operator chose it and does not guess from version order. `publish(..., gate={…})`
stores the trainer's gate verdict beside the version before CURRENT names it; the engine trusts that
verdict instead of gating again on each checkpoint's own metadata perplexity.

    publish(store, "lstm", "runs/lstm/best.safetensors", keep=5)   # -> version
    rollback(store, "lstm", "20261126T221500123Z")
    current_path(store, "lstm")                                     # -> Path or None
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from engine.files import atomic_write_bytes, fsync_dir, read_regular_file
from engine.model.checkpoint import CheckpointError, load_checkpoint, read_meta

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z._-]{1,64}$")


class StoreError(Exception):
    """A store operation that cannot be done; nothing was changed."""


class Superseded(StoreError):
    """publish(expect=…) found CURRENT naming another version: someone else moved it; nothing was changed."""


ANY = object()  # publish(expect=ANY): whatever CURRENT names (a hand publish)
CURRENT_LIMIT = 4096  # bytes: a version name and the rollback mark; a bigger CURRENT is none a writer here wrote
GATE_LIMIT = 64 * 1024  # bytes of a gate verdict (a few hundred in practice)
ROLLBACK = "rollback"  # CURRENT's second line after `rollback`


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise StoreError(f"bad model name {name!r}: use 1–32 of a-z, 0-9, _ and -")
    return name


def _model_dir(store: Path, name: str) -> Path:
    return Path(store) / check_name(name)


def version_path(store: Path, name: str, version: str) -> Path:
    if not VERSION_RE.match(version):
        raise StoreError(f"bad version {version!r}")
    return _model_dir(store, name) / "versions" / f"{version}.safetensors"


def model_names(store: Path) -> list[str]:
    """Names with a CURRENT pointer, sorted."""
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(d.name for d in store.iterdir() if NAME_RE.match(d.name) and (d / "CURRENT").is_file())


def current_state(store: Path, name: str) -> tuple[str | None, bool]:
    """(the version CURRENT names or None, whether `rollback` put it there), read in one go; StoreError when
    CURRENT is there but cannot be read as one (not UTF-8, a directory, a FIFO, too big).
    NOTE: read only if it is a regular file, without blocking: a FIFO put there stalled the engine's start."""
    pointer = _model_dir(store, name) / "CURRENT"
    try:
        lines = read_regular_file(pointer, CURRENT_LIMIT).decode("utf-8").split()
    except FileNotFoundError:
        return None, False
    except UnicodeDecodeError:
        raise StoreError(f"{name}/CURRENT is not UTF-8 text") from None
    except ValueError as e:  # not a regular file, or too big
        raise StoreError(f"{name}/CURRENT {str(e).removeprefix(f'{pointer} ')}") from None
    except OSError as e:
        raise StoreError(f"{name}/CURRENT cannot be read: {e.strerror or e}") from None
    if not lines:
        return None, False
    return lines[0], lines[1:2] == [ROLLBACK]


def current_version(store: Path, name: str) -> str | None:
    return current_state(store, name)[0]


def gate_path(store: Path, name: str, version: str) -> Path:
    return version_path(store, name, version).with_name(f"{version}.gate.json")


def gate_record(store: Path, name: str, version: str) -> dict | None:
    """The trainer's gate verdict for `version` (None when it was published by hand or the file is unreadable)."""
    try:
        record = json.loads(read_regular_file(gate_path(store, name, version), GATE_LIMIT))
    except (OSError, ValueError, RecursionError):  # none, not a regular file, too big, not JSON
        return None
    return record if isinstance(record, dict) else None


def current_path(store: Path, name: str) -> Path | None:
    version = current_version(store, name)
    return version_path(store, name, version) if version else None


@contextlib.contextmanager
def _writer_lock(store: Path, name: str):
    """Exclusive flock on <name>/.lock for the duration of one write; released by the kernel on a kill."""
    d = _model_dir(store, name)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def versions(store: Path, name: str) -> list[str]:
    """Complete published versions, oldest first (versions sort by time)."""
    d = _model_dir(store, name) / "versions"
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.safetensors") if not p.name.startswith("."))


def publish(store: Path, name: str, checkpoint: Path, keep: int = 5, *, expect=ANY, gate: dict | None = None) -> str:
    """Validate `checkpoint`, copy it in atomically, point CURRENT at it; returns its version.

    The copy is loaded in full (SHA-256 of the weights, shapes, finite values) before it becomes
    visible, so a corrupt file is refused with StoreError and nothing in the store changes.
    `expect`: the version CURRENT must still name (None: nothing published yet), else Superseded.
    `gate`: the trainer's verdict (perplexities, …), stored with the weights digest as <version>.gate.json.
    """
    if keep < 1:
        raise StoreError("keep must be at least 1")
    try:
        return _publish(Path(store), name, Path(checkpoint), keep, expect, gate)
    except OSError as e:  # a full disk, a read-only store: the temporary file is gone, CURRENT untouched
        raise StoreError(f"{name}: cannot publish {checkpoint}: {e.strerror or e}") from None


def _publish(store: Path, name: str, checkpoint: Path, keep: int, expect, gate: dict | None) -> str:
    try:
        meta = read_meta(checkpoint)
    except CheckpointError as e:
        raise StoreError(f"refusing to publish: {e}") from None
    version = meta["version"]
    target = version_path(store, name, version)
    with _writer_lock(store, name):
        if expect is not ANY and (cur := current_version(store, name)) != expect:
            raise Superseded(f"{name}: CURRENT is {cur!r}, not {expect!r} as expected; not publishing {version}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and _load_problem(target) is None:
            # Same version twice: fine when it is the same weights (re-publishing), an error otherwise —
            # pointing CURRENT at the file already there would serve something other than `checkpoint`.
            if read_meta(target).get("weights_sha256") != meta["weights_sha256"]:
                raise StoreError(f"{name}: version {version} is already published with different weights")
        else:  # new, or a damaged copy of it (a bad disk): a fresh copy of the source replaces it
            fd, tmp = tempfile.mkstemp(prefix=f".{version}.", suffix=".tmp", dir=target.parent)
            try:
                with open(checkpoint, "rb") as src, os.fdopen(fd, "wb") as dst:
                    os.fchmod(dst.fileno(), 0o644)
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
                try:
                    copied = load_checkpoint(tmp)
                except CheckpointError as e:
                    raise StoreError(f"refusing to publish {checkpoint}: {e.problem}") from None
                # NOTE: the version was read before the copy; a trainer saving a new best.safetensors in
                # between would put other weights under this version's name.
                if (copied.version, copied.meta["weights_sha256"]) != (version, meta["weights_sha256"]):
                    raise StoreError(f"refusing to publish {checkpoint}: it changed while being copied (now "
                                     f"version {copied.version}, was {version}); publish it again")
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            # The rename must be durable before CURRENT names it, or a power cut could leave CURRENT
            # pointing at a directory entry that never reached the disk.
            fsync_dir(target.parent)
        gate_file = gate_path(store, name, version)
        if gate is not None:
            # Durable before CURRENT moves: an engine that sees the new CURRENT finds the verdict too.
            verdict = {**gate, "passed": True, "version": version, "weights_sha256": meta["weights_sha256"],
                       "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            atomic_write_bytes(gate_file, json.dumps(verdict, default=str).encode())
        else:
            gate_file.unlink(missing_ok=True)  # a hand re-publish is not vouched for by an older verdict
        _set_current(store, name, version)
        _prune(store, name, keep)
    return version


def _load_problem(path: Path) -> str | None:
    """Why the engine would refuse the checkpoint at `path`; None when it loads."""
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        return e.problem
    return None


def _existing_model(store: Path, name: str) -> None:
    # NOTE: before the writer lock, which makes the model's directory: a mistyped store or name is an error,
    # not a new empty tree.
    if not _model_dir(store, name).is_dir():
        raise StoreError(f"{name}: no such model in the store {store} (it has {model_names(store) or 'none'})")


def set_current(store: Path, name: str, version: str) -> None:
    _existing_model(Path(store), name)
    with _writer_lock(store, name):
        _set_current(store, name, version, check=True)


def _set_current(store: Path, name: str, version: str, rollback: bool = False, check: bool = False) -> None:
    """Point CURRENT at `version`; `check`: load it first (publish has just loaded its copy)."""
    path = version_path(store, name, version)
    if not path.is_file():
        raise StoreError(f"{name}: no published version {version!r} (have {versions(store, name)})")
    if check and (problem := _load_problem(path)) is not None:  # never point CURRENT at a file the engine refuses
        raise StoreError(f"{name}: version {version} does not load ({problem}); CURRENT stays")
    # The rollback mark travels in the same atomic write as the version, so no reader sees one without the other.
    text = f"{version}\n{ROLLBACK}\n" if rollback else f"{version}\n"
    atomic_write_bytes(_model_dir(store, name) / "CURRENT", text.encode())


def rollback(store: Path, name: str, version: str | None = None) -> str:
    """Point CURRENT at `version`, or at the version before the current one, marked as a rollback; returns it."""
    _existing_model(Path(store), name)
    with _writer_lock(store, name):
        # Read under the lock: a publish finishing meanwhile would otherwise make "the one before" stale.
        if version is None:
            cur = current_version(store, name)
            older = [v for v in versions(store, name) if cur is None or v < cur]
            if not older:
                raise StoreError(f"{name}: no version older than {cur!r} to roll back to")
            version = older[-1]
        _set_current(store, name, version, rollback=True, check=True)
    return version


def prune(store: Path, name: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions, never the current one, and stale temporary files."""
    if keep < 1:
        raise StoreError("keep must be at least 1")
    with _writer_lock(store, name):
        return _prune(store, name, keep)


def _prune(store: Path, name: str, keep: int) -> list[str]:
    # Under the writer lock no one else is writing, so every temporary file is a killed writer's leftover
    # (version copies in versions/, CURRENT replacements in the model directory).
    d = _model_dir(store, name)
    for tmp in [*(d / "versions").glob(".*.tmp"), *d.glob(".CURRENT.*.tmp")]:
        tmp.unlink(missing_ok=True)
    cur = current_version(store, name)
    have = versions(store, name)
    doomed = [v for v in have[:-keep] if v != cur] if len(have) > keep else []
    for v in doomed:
        version_path(store, name, v).unlink(missing_ok=True)
        gate_path(store, name, v).unlink(missing_ok=True)
    return doomed
