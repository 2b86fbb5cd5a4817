"""The corpus's lines as the engine's known-lines table (engine.poem.known_lines): poems must not quote them.

    python -m trainer corpus lines                          # $CORPUS_DIR → $CHECKPOINT_DIR/known_lines.safetensors
    python -m trainer corpus lines --corpus DIR --store DIR

The engine loads the table from its store at start and again whenever the file changes, so new poems
stop quoting corpus lines within ENGINE_WATCH_INTERVAL. The retrain daemon writes the table on every run
when the store lacks it or it was built from another corpus (`refresh_known_lines`): an operator who
downloads the corpus gets the ban without another step. Every line of 诗 and 词 of MIN_LEN characters or
more goes in, held-out poems too: quoting a poet is quoting a poet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from engine.poem.known_lines import KNOWN_LINES_FILE, KnownLines, known_lines_from
from trainer.corpus import Corpus, CorpusError, load_corpus

log = logging.getLogger(__name__)


def table_of(corpus: Corpus) -> KnownLines:
    return known_lines_from((line for poem in corpus.poems for line in poem.lines), corpus_hash=corpus.digest())


def refresh_known_lines(paths: list[str], store: Path, force: bool = False) -> bool:
    """Write the store's table from the corpus at `paths` unless it was built from this very corpus (or
    `force`); True when written. Raises CorpusError when there is no usable corpus."""
    corpus = load_corpus(paths, include_ci=True)
    path = Path(store) / KNOWN_LINES_FILE
    try:
        if not force and KnownLines.load(path).meta.get("corpus_hash") == corpus.digest():
            return False
    except ValueError:  # none yet, or unreadable: write it
        pass
    table = table_of(corpus)
    _remove_stale_temporaries(path)
    table.save(path)
    log.info("known lines: wrote %d lines of corpus %s to %s", len(table), corpus.digest(), path)
    return True


STALE_SECONDS = 3600  # a temporary copy of the table this old is a killed writer's (a write takes seconds)


def _remove_stale_temporaries(path: Path) -> None:
    """Remove what a writer killed mid-write left beside the table (atomic_write_bytes' temporaries, some
    30 MB each); a fresh one may be another writer's, still at work."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > STALE_SECONDS:
                tmp.unlink()


def refresh_or_warn(paths: list[str], store: Path) -> bool:
    """refresh_known_lines for the daemon: a missing or unusable corpus is logged, not raised."""
    try:
        return refresh_known_lines(paths, store)
    except (CorpusError, OSError) as e:
        log.warning("known lines: not written (%s); poems may quote corpus lines until the corpus is there "
                    "(python -m trainer corpus download)", e)
        return False
    except Exception:  # a bug must not stop the retrain that follows it
        log.exception("known lines: not written")
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", nargs="+", default=[os.environ.get("CORPUS_DIR", "data/chinese-poetry")],
                        help="corpus directories or files (default $CORPUS_DIR or data/chinese-poetry)")
    parser.add_argument("--store", default=os.environ.get("CHECKPOINT_DIR", "var/checkpoints"),
                        help="the checkpoint store the engine watches (default $CHECKPOINT_DIR or var/checkpoints)")
    parser.add_argument("--force", action="store_true", help="write the table even if it is up to date")


def main(args: argparse.Namespace) -> int:
    store = Path(args.store)
    try:
        written = refresh_known_lines(args.corpus, store, args.force)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = KnownLines.load(store / KNOWN_LINES_FILE)
    print(json.dumps({"out": str(store / KNOWN_LINES_FILE), "lines": len(table), "written": written,
                      "corpus_hash": table.meta.get("corpus_hash"), "bytes": (store / KNOWN_LINES_FILE).stat().st_size}))
    return 0
