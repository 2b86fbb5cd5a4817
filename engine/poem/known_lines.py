"""Lines a poem must not quote: the corpus's, so that a model which has read 白日依山尽 many times writes a
line of its own there instead of the poet's.

    table = known_lines_from(lines)                  # the trainer, from the corpus (trainer.corpus lines)
    table.save(store / KNOWN_LINES_FILE)             # safetensors, atomic; the engine loads it from the store
    table = KnownLines.load(path)
    known = table.for_vocab(vocab)                   # one model's token ids, cached per vocabulary
    known.completions(head_tokens)                   # tokens that would end a known line after this head

A row at a line's last character may not take a token that completes a known line (RowState._prepare;
engine.poem.device_rows does the same on a device). A prompt, acrostic or keyword that forces a line's
last character is still written: the user asked for it.

The table holds no text: per line of MIN_LEN or more characters, a key hashed from its length and head
(every character but the last) and the last character's code point, sorted by key. The key is two
polynomial hashes modulo primes below 2³¹, so every product fits in int64 and DeviceRows folds the same
hashes in torch, a character at a time.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.files import atomic_write_bytes, read_regular_file

KNOWN_LINES_FILE = "known_lines.safetensors"  # in CHECKPOINT_DIR, beside the models' folders
MIN_LEN = 5  # shorter lines (词's 三字句) are too common to ban
MODULI = (2147483647, 2147483629)  # primes below 2³¹
BASES = (1000003, 1315423911 % 2147483629)
FORMAT = "yinshi-known-lines-1"
HASH = f"min{MIN_LEN}-bases{BASES[0]},{BASES[1]}-moduli{MODULI[0]},{MODULI[1]}"  # a table keyed otherwise is refused
MAX_FILE_BYTES = 1 << 30  # the whole corpus's table is some 32 MB
MAX_RUN = 256  # lines sharing one key (the corpus has at most 27): how far a lookup on a device reads
MAX_CODE_POINT = 0x10FFFF


def key_of(length: int, head: Iterable[int]) -> int:
    """The key of a line of `length` characters whose head has these code points (or token codes)."""
    h1 = h2 = length
    for c in head:
        h1 = (h1 * BASES[0] + c) % MODULI[0]
        h2 = (h2 * BASES[1] + c) % MODULI[1]
    return (h1 << 31) | h2


@dataclass(eq=False)
class KnownLines:
    keys: np.ndarray  # (N,) int64, ascending
    lasts: np.ndarray  # (N,) int32: the code point ending each line
    meta: dict = field(default_factory=dict)  # corpus_hash, lines
    _vocabs: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    width: int = field(init=False, default=0)  # the most lines sharing one key

    def __post_init__(self):
        # NOTE: a table is read from the store, so its values are checked before anything is sized by them.
        if len(self.lasts) and not ((self.lasts >= 0) & (self.lasts <= MAX_CODE_POINT)).all():
            raise ValueError("a last character is not a Unicode code point")
        if len(self.keys):
            starts = np.flatnonzero(np.diff(self.keys)) + 1
            self.width = int(np.diff(np.concatenate(([0], starts, [len(self.keys)]))).max())
            if self.width > MAX_RUN:
                raise ValueError(f"{self.width} lines share one key (at most {MAX_RUN})")

    def __len__(self) -> int:
        return len(self.keys)

    def for_vocab(self, vocab) -> VocabLines:
        """The table in one vocabulary's token ids (once per Vocab object)."""
        found = self._vocabs.get(vocab)
        if found is None:
            found = self._vocabs[vocab] = VocabLines(self, vocab)
        return found

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save

        meta = {"format": FORMAT, "hash": HASH, **{k: str(v) for k, v in self.meta.items() if k not in ("format", "hash")}}
        atomic_write_bytes(Path(path), save({"keys": self.keys, "lasts": self.lasts}, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> KnownLines:
        """The table at `path`; ValueError when it is not one (a bad or foreign file changes nothing)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load as load_tensors

        try:
            data = read_regular_file(Path(path), MAX_FILE_BYTES)
            size = int.from_bytes(data[:8], "little")
            if len(data) < 8 or 8 + size > len(data):
                raise ValueError(f"{path}: cannot read the known-lines table: no safetensors header")
            meta = json.loads(data[8:8 + size]).get("__metadata__") or {}
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a known-lines table ({FORMAT})")
            if meta.get("hash") != HASH:
                raise ValueError(f"{path} was keyed another way ({meta.get('hash')}, not {HASH}); write it "
                                 f"again: python -m trainer corpus lines --force")
            tensors = load_tensors(data)
            keys, lasts = tensors["keys"], tensors["lasts"]
        except (OSError, KeyError, SafetensorError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{path}: cannot read the known-lines table: {e}") from None
        if keys.dtype != np.int64 or lasts.dtype != np.int32 or keys.shape != lasts.shape or keys.ndim != 1:
            raise ValueError(f"{path}: keys and lasts must be int64 and int32 of one length")
        if len(keys) > 1 and not (keys[1:] >= keys[:-1]).all():
            raise ValueError(f"{path}: keys are not sorted")
        try:
            return cls(keys, lasts, {k: v for k, v in meta.items() if k not in ("format", "hash")})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def known_lines_from(lines: Iterable[str], **meta) -> KnownLines:
    """The table of these lines (those of MIN_LEN characters or more; duplicates once)."""
    pairs = {(key_of(len(line), map(ord, line[:-1])), ord(line[-1])) for line in lines if len(line) >= MIN_LEN}
    ordered = sorted(pairs)
    keys = np.fromiter((k for k, _ in ordered), dtype=np.int64, count=len(ordered))
    lasts = np.fromiter((c for _, c in ordered), dtype=np.int32, count=len(ordered))
    return KnownLines(keys, lasts, {"lines": len(ordered), **meta})


class VocabLines:
    """A KnownLines table for one vocabulary: the last characters as its token ids (-1: not in it)."""

    def __init__(self, table: KnownLines, vocab):
        self.num_lines = len(table)  # NOTE: not the table itself, which holds this: no cycle keeps an old one
        self.keys = table.keys
        self.width = table.width  # how far a lookup on a device reads past its first match
        self.on_device: dict = {}  # device → engine.poem.device_rows.KnownTable, made once per device
        codes = np.array([ord(t) if len(t) == 1 else -1 for t in vocab.tokens], dtype=np.int64)
        self.codes = codes  # token id → code point (-1 for special tokens such as <eos>)
        top = max(int(codes.max(initial=0)), int(table.lasts.max(initial=0))) + 1
        lookup = np.full(top, -1, dtype=np.int32)
        lookup[codes[codes >= 0]] = np.nonzero(codes >= 0)[0]
        self.last_tokens = lookup[table.lasts] if len(table.lasts) else np.zeros(0, np.int32)

    def completions(self, head: Iterable[int]) -> list[int]:
        """Token ids that would complete a known line whose head is these token ids."""
        head = list(head)
        if len(head) + 1 < MIN_LEN or not len(self.keys):
            return []
        codes = self.codes[head]
        if (codes < 0).any():
            return []
        key = key_of(len(head) + 1, codes.tolist())
        lo = int(np.searchsorted(self.keys, key, side="left"))
        hi = int(np.searchsorted(self.keys, key, side="right"))
        return [int(t) for t in self.last_tokens[lo:hi] if t >= 0]

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys int64, last tokens int32, token codes int64) as CPU tensors sharing this table's memory,
        for engine.poem.device_rows to move."""
        return torch.from_numpy(self.keys), torch.from_numpy(self.last_tokens), torch.from_numpy(self.codes)
