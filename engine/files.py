"""Durable writes: a reader sees the old file or the whole new one, never a part, and a rename survives a
power cut. Checkpoints, the version store, training state and the corpus download all write this way."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a checkpoint is read by other users (the engine's)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_regular_file(path: Path, limit: int, follow_links: bool = True) -> bytes:
    """The bytes of the regular file at `path`: ValueError for anything else (a FIFO, a directory) or over
    `limit` bytes; OSError from opening it (FileNotFoundError; ELOOP for a link when not `follow_links`).
    NOTE: opened without blocking and checked on the open descriptor, so a FIFO put there cannot stall the
    reader (and the whole process with it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        data = f.read(limit + 1)
    if max(st.st_size, len(data)) > limit:
        raise ValueError(f"{path} has {max(st.st_size, len(data))} bytes (at most {limit})")
    return data
