"""Fetch the chinese-poetry files the trainer reads, resumably, each one checked as JSON before it is kept.

    python -m trainer corpus download --dest data/chinese-poetry [--include-ci] [--base-url URL] [--only GLOB]

The upstream repository has no index file we can read over raw HTTP, so the file list is here in code
(`file_list`): 全唐诗/poet.tang.{0..57000}.json and poet.song.{0..254000}.json every 1000, 唐诗三百首.json,
and with `--include-ci` 宋词/ci.song.{0..21000}.json and 宋词三百首.json. The destination keeps the
upstream layout, so `python -m trainer train --corpus DEST` reads it unchanged.

Each file streams into a hidden `.NAME.part` beside its target; when the body is complete and parses as
a JSON array it is fsynced and renamed into place, so a file under its real name is always whole. A run
that stops half-way leaves the `.part`, and the next run asks for the rest with an HTTP Range request.
Files already present and valid are skipped. Errors are one line per file; the summary is the last line.
"""

from __future__ import annotations

import asyncio
import fcntl
import fnmatch
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import aiohttp

from engine.files import atomic_write_bytes, fsync_dir

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/chinese-poetry/chinese-poetry/master"
CHUNK = 1 << 16


class DownloadError(Exception):
    """One file that could not be fetched; the message is one line."""


class NotUpstream(DownloadError):
    """The server has no such file (HTTP 404): asking again will not fetch it."""


def file_list(include_ci: bool = False) -> list[str]:
    """Upstream paths (relative to the repository root) of every file the trainer reads."""
    files = [f"全唐诗/poet.tang.{n}.json" for n in range(0, 57_001, 1000)]
    files += [f"全唐诗/poet.song.{n}.json" for n in range(0, 254_001, 1000)]
    files.append("全唐诗/唐诗三百首.json")
    if include_ci:
        files += [f"宋词/ci.song.{n}.json" for n in range(0, 21_001, 1000)]
        files.append("宋词/宋词三百首.json")
    return files


@dataclass
class DownloadResult:
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present and valid
    failed: dict[str, str] = field(default_factory=dict)  # path → why
    missing: list[str] = field(default_factory=list)  # of those, the ones the server does not have (404)
    num_bytes: int = 0  # fetched over the network in this run
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (f"{len(self.downloaded)} downloaded ({self.num_bytes / 1e6:.1f} MB), {len(self.skipped)} already "
                f"present, {len(self.failed)} failed, in {self.seconds:.1f}s")


def check_json(data: bytes, what: str) -> None:
    """Raise DownloadError unless `data` is a JSON array (every chinese-poetry file is one)."""
    try:  # strictly UTF-8, as the corpus reader reads it (json.loads(bytes) would also take UTF-16 or a BOM)
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DownloadError(f"{what}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DownloadError(f"{what}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # a 5,000-digit number, nesting deeper than Python's stack
        raise DownloadError(f"{what}: unreadable JSON ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(value, list):
        raise DownloadError(f"{what}: expected a JSON array, got {type(value).__name__}")


def is_complete(path: Path) -> bool:
    """A file already under its real name that parses: the last run finished it."""
    try:
        check_json(path.read_bytes(), str(path))
    except (OSError, DownloadError):
        return False
    return True


def _part_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.part")


def _validator_path(part: Path) -> Path:
    """Beside a part: the ETag (or Last-Modified) of the response it began with, for If-Range on resume."""
    return part.with_name(part.name + ".validator")


def _drop_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validator_path(part).unlink(missing_ok=True)


def _finish(part: Path, target: Path) -> None:
    """fsync the finished part file, rename it into place and fsync the directory (the rename itself)."""
    with part.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, target)
    fsync_dir(target.parent)


class _Transient(Exception):
    """Worth another try: a server error, a dropped connection, a timeout."""


async def _fetch_once(session: aiohttp.ClientSession, url: str, rel: str, target: Path) -> int:
    """One attempt: (re)start or continue `target`'s part file; returns the bytes received."""
    part = _part_path(target)
    have = part.stat().st_size if part.exists() else 0
    validator = _validator_path(part).read_text().strip() if have and _validator_path(part).exists() else ""
    if have and not validator:
        # NOTE: without a validator nothing says upstream still holds the file the part began: appending
        # its rest to our start could splice two versions together. Start over.
        _drop_part(part)
        have = 0
    # The part holds the file's own bytes (aiohttp undoes gzip), so a resume asks for the rest of the
    # identity encoding: byte offsets into a gzip stream would not line up with it. If-Range: the rest only
    # if the file is still the one the part began, else the whole file (a 200).
    headers = {"Range": f"bytes={have}-", "If-Range": validator, "Accept-Encoding": "identity"} if have else {}
    received = 0
    async with session.get(url, headers=headers) as resp:
        if resp.status == 416 and have:
            # The part is as long as the file or longer: a stale part. Start over next try.
            _drop_part(part)
            raise _Transient("HTTP 416 on resume; restarting the file")
        if resp.status >= 500 or resp.status == 429:
            raise _Transient(f"HTTP {resp.status} {resp.reason}")
        if resp.status == 404:
            raise NotUpstream(f"{rel}: HTTP 404 {resp.reason} ({url})")
        if resp.status not in (200, 206):
            raise DownloadError(f"{rel}: HTTP {resp.status} {resp.reason} ({url})")
        if resp.status == 206 and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            _drop_part(part)  # not the range we asked for: appending would corrupt the file
            raise _Transient(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}; restarting the file")
        mode = "ab" if resp.status == 206 else "wb"  # a 200 is the whole file: the server ignored Range
        resumed_from = have if resp.status == 206 else 0
        expected = resp.content_length
        target.parent.mkdir(parents=True, exist_ok=True)
        if resp.status == 200:  # a new start: remember what it is a start of (a weak ETag cannot be If-Range)
            etag = resp.headers.get("ETag", "")
            new_validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified", "")
            if new_validator:
                atomic_write_bytes(_validator_path(part), new_validator.encode())
            else:
                _validator_path(part).unlink(missing_ok=True)
        try:
            with part.open(mode) as f:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    f.write(chunk)
                    received += len(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
            # Keep what arrived: the next try asks for the rest with Range.
            raise _Transient(f"connection lost after {resumed_from + received} bytes ({type(e).__name__})") from None
        # Content-Length counts encoded bytes; only an unencoded body can be checked against it here
        # (aiohttp itself reports a gzip stream cut short as a payload error).
        if expected is not None and "Content-Encoding" not in resp.headers and received < expected:
            raise _Transient(f"truncated: {received} of {expected} bytes")
    try:
        check_json(part.read_bytes(), rel)
    except DownloadError:
        _drop_part(part)  # a resumed part may be the bad half; the next run starts clean
        raise
    _finish(part, target)
    _validator_path(part).unlink(missing_ok=True)
    return received


async def fetch_file(session, sem: asyncio.Semaphore, base_url: str, rel: str, dest: Path,
                     retries: int, retry_delay: float) -> int:
    """Fetch one file with up to `retries` extra tries for transient errors; returns bytes received."""
    url = f"{base_url.rstrip('/')}/{quote(rel)}"
    target = dest / rel
    async with sem:
        for attempt in range(retries + 1):
            try:
                return await _fetch_once(session, url, rel, target)
            except _Transient as e:
                if attempt == retries:
                    raise DownloadError(f"{rel}: {e} ({url}; gave up after {retries + 1} tries)") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                if attempt == retries:
                    why = str(e) or type(e).__name__
                    raise DownloadError(f"{rel}: {why} ({url}; gave up after {retries + 1} tries)") from None
            await asyncio.sleep(retry_delay * 2**attempt)
    raise AssertionError("unreachable")


async def download(dest, files: Iterable[str] | None = None, base_url: str = DEFAULT_BASE_URL,
                   concurrency: int = 8, retries: int = 3, retry_delay: float = 1.0, timeout: float = 120.0,
                   log: Callable[[str], None] = lambda m: None) -> DownloadResult:
    """Fetch `files` (default: `file_list()`) under `dest`; failures are collected, not raised."""
    if retries < 0:
        raise ValueError(f"retries must be 0 or more, got {retries}")
    dest = Path(dest)
    files = list(files) if files is not None else file_list()
    result = DownloadResult()
    t0 = time.monotonic()
    todo = []
    for rel in files:
        if is_complete(dest / rel):
            result.skipped.append(rel)
        else:
            todo.append(rel)
    sem = asyncio.Semaphore(max(1, concurrency))
    client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout, raise_for_status=False) as session:

        async def one(rel: str):
            try:
                n = await fetch_file(session, sem, base_url, rel, dest, retries, retry_delay)
            except DownloadError as e:
                result.failed[rel] = str(e)
                if isinstance(e, NotUpstream):
                    result.missing.append(rel)
                log(f"error: {e}")
            else:
                result.downloaded.append(rel)
                result.num_bytes += n
                log(f"ok {rel} ({n / 1e3:.0f} kB)")

        await asyncio.gather(*(one(rel) for rel in todo))
    result.seconds = time.monotonic() - t0
    return result


# -- the daemon's download ---------------------------------------------------------------------------------
UNFINISHED = ".download-unfinished"  # in the destination while a daemon's download has files to go
DOWNLOAD_LOCK = ".download.lock"  # one download into a directory at a time
UPSTREAM_DIRS = ("全唐诗", "宋词")  # what a download writes, besides hidden files


def wants_corpus(dest) -> bool:
    """Whether the retrain daemon should fill `dest`: it is missing, or holds nothing but hidden files
    (.gitkeep), or holds only the upstream layout while a download begun there is unfinished. A directory
    holding anything else is the operator's corpus, and stays as it is; so does a path named like a file."""
    dest = Path(dest).resolve()  # a symlink: the directory it names, created if it is not there yet
    if not dest.exists():
        return dest.suffix != ".json"
    if not dest.is_dir():
        return False
    shown = [p.name for p in dest.iterdir() if not p.name.startswith(".")]
    return not shown or ((dest / UNFINISHED).exists() and all(name in UPSTREAM_DIRS for name in shown))


def fetch_corpus(dest, base_url: str = DEFAULT_BASE_URL, log: Callable[[str], None] = lambda m: None,
                 **kw) -> DownloadResult | None:
    """Fill `dest` with every file the trainer reads, 宋词 included, when `wants_corpus(dest)`; None when it
    does not, or when another process is filling it right now. The marker stays until every file the
    server has is whole, so a run that stops half-way is taken up again by the next one, and a finished
    corpus is never asked for again (nor a file the server does not have: it is named once, in `missing`)."""
    dest = Path(dest).resolve()
    if not wants_corpus(dest):
        return None
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / DOWNLOAD_LOCK, "a") as lock:
        try:
            # NOTE: two downloads into one directory would append to each other's parts.
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        if not wants_corpus(dest):  # the other process finished it meanwhile
            return None
        marker = dest / UNFINISHED
        if not marker.exists():
            atomic_write_bytes(marker, b"")
        files = file_list(include_ci=True)
        missing = [rel for rel in files if not is_complete(dest / rel)]  # each file read and parsed once
        # NOTE: one missing file first: without a network every file would fail alike, each after its
        # retries (minutes of the daemon's retrain worker); the next run tries again.
        result = asyncio.run(download(dest, missing[:1], base_url, log=log, **kw))
        if not result.failed or result.missing:
            rest = asyncio.run(download(dest, missing[1:], base_url, log=log, **kw))
            result.downloaded += rest.downloaded
            result.failed.update(rest.failed)
            result.missing += rest.missing
            result.num_bytes += rest.num_bytes
            result.seconds += rest.seconds
        result.skipped = [rel for rel in files if rel not in missing]
        if len(result.missing) == len(result.failed):
            marker.unlink()
            fsync_dir(dest)
    return result


# -- command line -------------------------------------------------------------------------------------------
def add_arguments(p):
    p.add_argument("--dest", required=True, help="directory to fill (the upstream layout is kept)")
    p.add_argument("--base-url", default=os.environ.get("CORPUS_BASE_URL", DEFAULT_BASE_URL),
                   help=f"raw file root of the repository (default {DEFAULT_BASE_URL})")
    p.add_argument("--include-ci", action="store_true", help="also fetch 宋词 (ci): the 词 model (ci) trains on them")
    p.add_argument("--only", action="append", metavar="GLOB",
                   help="fetch only the listed paths matching GLOB (repeatable), e.g. '全唐诗/poet.tang.*'")
    p.add_argument("--concurrency", type=int, default=8, help="files fetched at once (default 8)")
    p.add_argument("--retries", type=int, default=3, help="extra tries for server errors and drops (default 3)")
    p.add_argument("--retry-delay", type=float, default=1.0, help="seconds before the first retry, doubling")
    p.add_argument("--quiet", action="store_true", help="print errors and the summary only")


def main(args) -> int:
    import sys

    log_ok = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))

    def log(message: str):
        (print(message, file=sys.stderr, flush=True) if message.startswith("error:") else log_ok(message))

    files = file_list(args.include_ci)
    if args.only:
        files = [f for f in files if any(fnmatch.fnmatchcase(f, pattern) for pattern in args.only)]
        if not files:
            raise ValueError(f"--only {' '.join(args.only)} matches none of the {len(file_list(True))} known files")
    result = asyncio.run(download(args.dest, files, args.base_url, args.concurrency, args.retries,
                                  args.retry_delay, log=log))
    print(f"{'done' if result.ok else 'incomplete'}: {result.summary()} → {args.dest}")
    return 0 if result.ok else 1
