"""Publishing by hand: put a checkpoint into the store, roll back, list versions (engine.model.versions underneath).

    python -m trainer publish --store var/checkpoints --name lstm --checkpoint runs/lstm/best.safetensors --keep 5
    python -m trainer rollback --store var/checkpoints --name lstm [--version 20261126T221500123Z]
    python -m trainer versions --store var/checkpoints --name lstm [--json]

`--store` defaults to CHECKPOINT_DIR. Each publish and rollback is appended to the store's run records
(CHECKPOINT_DIR/.trainer/runs.jsonl) beside the scheduled runs, so the history shows who changed what.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys

from engine.model import versions as store
from engine.model.checkpoint import CheckpointError, read_meta
from trainer.retrain import RetrainConfig, append_record


def _store_args(p: argparse.ArgumentParser):
    default = os.environ.get("CHECKPOINT_DIR") or RetrainConfig.store
    p.add_argument("--store", default=default, help=f"checkpoint store (CHECKPOINT_DIR, default {default})")
    # The engine's default model (first of ENGINE_MODELS), read loosely: a bad value must not break --help.
    default_name = next((n.strip() for n in os.environ.get("ENGINE_MODELS", "").split(",") if n.strip()),
                        RetrainConfig.names[0])
    p.add_argument("--name", default=default_name, help=f"model name in the store (default {default_name})")


def add_publish_arguments(p: argparse.ArgumentParser):
    _store_args(p)
    p.add_argument("--checkpoint", required=True, help="a checkpoint file, e.g. runs/lstm/best.safetensors")
    p.add_argument("--keep", type=int, default=5, help="published versions to keep (default 5)")


def add_rollback_arguments(p: argparse.ArgumentParser):
    _store_args(p)
    p.add_argument("--version", help="a kept version (default: the one before the current)")


def add_versions_arguments(p: argparse.ArgumentParser):
    _store_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")


def _record(args, **fields):
    append_record(args.store, {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "name": args.name, "reason": "command line", **fields})


def publish_main(args) -> int:
    try:
        version = store.publish(args.store, args.name, args.checkpoint, keep=args.keep)
    except store.StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _record(args, kind="publish", outcome="published", version=version, checkpoint=str(args.checkpoint))
    print(json.dumps({"name": args.name, "version": version, "versions": store.versions(args.store, args.name)}))
    return 0


def rollback_main(args) -> int:
    try:
        before = store.current_version(args.store, args.name)
        version = store.rollback(args.store, args.name, args.version)
    except store.StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _record(args, kind="rollback", outcome="rolled back", version=version, previous=before)
    print(json.dumps({"name": args.name, "version": version, "previous": before}))
    return 0


def versions_main(args) -> int:
    try:
        current = store.current_version(args.store, args.name)
        have = store.versions(args.store, args.name)
    except store.StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for v in have:
        try:
            meta = read_meta(store.version_path(args.store, args.name, v))
            info = {"created_at": meta.get("created_at"), "val_ppl": (meta.get("metrics") or {}).get("val_ppl"),
                    "corpus_hash": meta.get("corpus_hash"), "cell": meta["config"].get("cell")}
        except CheckpointError as e:
            info = {"error": e.problem}
        rows.append({"version": v, "current": v == current, **info})
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    if not rows:
        print(f"{args.name}: nothing published in {args.store}")
        return 0
    for row in rows:
        mark = "*" if row["current"] else " "
        rest = row.get("error") or f"{row['cell']}  ppl {row['val_ppl']}  corpus {row['corpus_hash']}  {row['created_at']}"
        print(f"{mark} {row['version']}  {rest}")
    return 0
