"""Moving a checkpoint through a channel that takes small files: split it into parts, join them again.

    python -m trainer export --checkpoint runs/gpu/best.safetensors --out $OUT --name lstm [--int8] [--part-mib 16]
    python -m trainer join $OUT/lstm.safetensors.part000 --out engine/checkpoints/lstm.safetensors

`export` re-saves the checkpoint (as int8 with `--int8`), then writes `<name>.safetensors.partNNN` files
of at most `--part-mib` MiB each and `<name>.safetensors.sha256`. `join` puts the parts together, checks
the SHA-256, loads the result as the engine would (every check of `load_checkpoint`) and only then
writes it, atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from engine.files import atomic_write_bytes
from engine.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

MIB = 1 << 20


MAX_PARTS = 1000  # part000 … part999: what `join` reads back


def export(checkpoint: Path, out: Path, name: str, int8: bool = False, part_mib: float = 16) -> dict:
    if not part_mib > 0:
        raise ValueError(f"--part-mib must be positive, got {part_mib}")
    ckpt = load_checkpoint(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.safetensors"
        meta = {k: v for k, v in ckpt.meta.items() if k not in ("version", "created_at")}
        meta["version"], meta["created_at"] = ckpt.meta["version"], ckpt.meta.get("created_at")
        half = ckpt.meta.get("dtype") == "float16" and not int8
        save_checkpoint(whole, ckpt.model, ckpt.vocab, meta, half=half, int8=int8)
        data = whole.read_bytes()
    size = max(1, int(part_mib * MIB))
    if len(data) > MAX_PARTS * size:
        raise ValueError(f"{len(data)} bytes in parts of {part_mib:g} MiB would make more than {MAX_PARTS} parts, "
                         f"more than join reads: raise --part-mib")
    for old in out.glob(f"{name}.safetensors.part*"):
        old.unlink()
    parts = []
    for i in range(0, len(data), size):
        part = out / f"{name}.safetensors.part{i // size:03d}"
        atomic_write_bytes(part, data[i:i + size])
        parts.append(part.name)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(out / f"{name}.safetensors.sha256", f"{digest}  {name}.safetensors\n".encode())
    # What was written: an int8 checkpoint exported without --int8 is float32 now, not int8.
    return {"bytes": len(data), "parts": parts, "sha256": digest,
            "dtype": "int8" if int8 else "float16" if half else "float32"}


def join(first_part: Path, out: Path) -> dict:
    """Parts → one verified checkpoint at `out`; CheckpointError (nothing written) when anything is off."""
    stem = first_part.name.rsplit(".part", 1)[0]
    folder = first_part.parent
    parts = sorted(folder.glob(f"{stem}.part[0-9][0-9][0-9]"))
    manifest = folder / f"{stem}.sha256"
    if not parts or not manifest.is_file():
        raise CheckpointError(first_part, f"no parts {stem}.partNNN or no {manifest.name} beside them")
    data = b"".join(p.read_bytes() for p in parts)
    words = manifest.read_text(errors="replace").split()
    if not words:
        raise CheckpointError(first_part, f"{manifest.name} holds no SHA-256 digest")
    want = words[0]
    if hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(first_part, f"the {len(parts)} parts do not match {manifest.name}: missing or damaged part")
    with tempfile.TemporaryDirectory() as tmp:
        check = Path(tmp) / stem
        check.write_bytes(data)
        ckpt = load_checkpoint(check)
    atomic_write_bytes(out, data)
    return {"out": str(out), "bytes": len(data), "parts": len(parts), "version": ckpt.version}


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="folder for the parts")
    p.add_argument("--name", required=True, help="the parts are NAME.safetensors.partNNN")
    p.add_argument("--int8", action="store_true", help="int8 matrices with per-row scales")
    p.add_argument("--part-mib", type=float, default=16)


def add_join_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("first_part", help="NAME.safetensors.part000")
    p.add_argument("--out", required=True)


def export_main(args) -> int:
    if not args.part_mib > 0:
        print("error: --part-mib must be positive", file=sys.stderr)
        return 2
    print(json.dumps(export(Path(args.checkpoint), Path(args.out), args.name, args.int8, args.part_mib)))
    return 0


def join_main(args) -> int:
    print(json.dumps(join(Path(args.first_part), Path(args.out))))
    return 0
