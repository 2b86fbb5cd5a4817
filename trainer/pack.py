"""A compact, preprocessed training set for a machine that has the repository but not the corpus.

    python -m trainer pack --corpus ../shared/corpus/chinese-poetry --out data/packed.safetensors
    python -m trainer train --packed data/packed.safetensors --out runs/gpu --device cuda …

One safetensors file: the vocabulary (built from the training split, as `train` builds it) and every
regular poem encoded as <form> text <eos>, as int16 tensors `train.<form>` and `val.<form>` (N, T), the
split the usual one by hash, so the held-out poems stay out of training here too. The corpus's 214,000
training poems take about 20 MB. `data/` is ignored by git: the file travels with the working tree to a
GPU machine (`scripts/gpu_train.sh`) and is never committed.

`--include-ci` packs the Song 词 too (`ci.<length>` tensors, each opened by its tune's token, as
`train --kind ci` encodes them): a model trained on it writes both 诗 and 词.

The repository and what it carries must fit the GPU machine's 64 MiB together, and the shipped checkpoints
take most of it. `--val-poems N` keeps N held-out poems of each kind, drawn evenly (a run validates on a few
thousand; the held-out split itself is unchanged), and `--xz` compresses the file (about half), which
`load_pack` reads back by its magic bytes:

    python -m trainer corpus pack --val-poems 2000 --xz --out data/packed.safetensors.xz     # about 10 MB
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from engine.files import atomic_write_bytes
from engine.poem.vocab import Vocab
from trainer.corpus import CorpusError, load_corpus, split
from trainer.data import Buckets, ci_poems, ci_vocab, stanza_poems

FORMAT = "yinshi-packed-corpus"
XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass
class PackedCorpus:
    vocab: Vocab
    train: Buckets
    val: Buckets
    corpus_hash: str


def pack_corpus(paths: list[str], out: Path, val_percent: int = 5, min_count: int = 5, max_vocab: int = 6000,
                include_ci: bool = False, tune_tokens: int = 80, val_poems: int = 0, xz: bool = False,
                include_stanzas: bool = False) -> dict:
    """Write the packed file; returns its metadata. `val_poems` > 0 keeps that many held-out poems of each
    kind (诗, and 词 with `include_ci`), drawn evenly; `xz` compresses the file. `include_stanzas` adds the
    training split's irregular poems cut into 绝句-shaped stanzas (trainer.data.stanza_poems) to training."""
    if val_poems < 0:
        raise ValueError(f"val_poems must not be negative, got {val_poems}")
    corpus = load_corpus(paths, include_ci=include_ci)
    train, val = split(corpus.regular(), val_percent)
    if not train or not val:
        raise CorpusError(f"{', '.join(paths)}: the training or the validation split is empty")
    vocab = Vocab.build((p.text for p in train), min_count, max_vocab)
    stanzas = []
    if include_stanzas:
        irregular_train, irregular_val = split([p for p in corpus.poems if p.form == "other"], val_percent)
        held_out_lines = {line for p in val + irregular_val for line in p.lines}
        stanzas = stanza_poems(irregular_train, vocab, held_out_lines)
        train = train + stanzas
    val = _sample(val, val_poems)
    if include_ci:
        ci_train, ci_val = split(ci_poems(corpus), val_percent)
        if not ci_train:
            raise CorpusError(f"{', '.join(paths)}: --include-ci, but the corpus holds no 词 (download them with --include-ci)")
        vocab = ci_vocab(vocab, ci_train, min_count, tune_tokens)
        train, val = train + ci_train, val + _sample(ci_val, val_poems)
    if len(vocab) >= 2**15:
        raise ValueError(f"a vocabulary of {len(vocab)} tokens does not fit int16")
    tensors = {f"{name}.{form}": t.to(torch.int16).contiguous()
               for name, poems in (("train", train), ("val", val))
               for form, t in Buckets.build(vocab, poems).tensors.items()}
    meta = {"format": FORMAT, "vocab": vocab.tokens, "corpus_hash": corpus.digest(), "val_percent": val_percent,
            "train_poems": len(train), "val_poems": len(val), "stanzas": len(stanzas)}
    data = save(tensors, metadata={"yinshi": json.dumps(meta, ensure_ascii=False)})
    atomic_write_bytes(Path(out), lzma.compress(data, preset=9) if xz else data)
    return meta


def _sample(poems: list, n: int) -> list:
    """n of the poems drawn evenly (a fixed seed), in their order; all of them when n is 0. The corpus lists
    Song before Tang, so its first n held-out poems would all be Song."""
    if not n or n >= len(poems):
        return poems
    keep = sorted(random.Random(0).sample(range(len(poems)), n))
    return [poems[i] for i in keep]


def _read_pack(path) -> tuple[dict, dict]:
    """(metadata, tensors) of a packed file, plain or xz-compressed."""
    data = Path(path).read_bytes()
    if data.startswith(XZ_MAGIC):
        data = lzma.decompress(data)
    size = int.from_bytes(data[:8], "little")  # safetensors: an 8-byte header length, then the JSON header
    header = json.loads(data[8:8 + size])
    return json.loads((header.get("__metadata__") or {}).get("yinshi", "{}")), load(data)


def load_pack(path) -> PackedCorpus:
    """Read a packed file; CorpusError naming it when it is not one."""
    try:
        meta, tensors = _read_pack(path)
    except (SafetensorError, OSError, ValueError, lzma.LZMAError, AttributeError, TypeError, KeyError) as e:
        raise CorpusError(f"{path}: not a packed corpus ({e})") from None
    if meta.get("format") != FORMAT:
        raise CorpusError(f"{path}: not a packed corpus (no {FORMAT} metadata)")
    vocab = Vocab(meta["vocab"])
    parts = {"train": {}, "val": {}}
    for key, t in tensors.items():
        name, form = key.split(".", 1)
        if int(t.max()) >= len(vocab) or int(t.min()) < 0:
            raise CorpusError(f"{path}: {key} holds token ids outside the vocabulary")
        parts[name][form] = t.long()
    return PackedCorpus(vocab, Buckets(dict(sorted(parts["train"].items()))), Buckets(dict(sorted(parts["val"].items()))),
                        meta["corpus_hash"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", nargs="+", default=["../shared/corpus/chinese-poetry"])
    parser.add_argument("--out", default="data/packed.safetensors")
    parser.add_argument("--val-percent", type=int, default=5)
    parser.add_argument("--min-count", type=int, default=5)
    parser.add_argument("--max-vocab", type=int, default=6000)
    parser.add_argument("--include-ci", action="store_true", help="pack the Song 词 too (a model that writes both)")
    parser.add_argument("--include-stanzas", action="store_true",
                        help="train on the irregular poems' 绝句-shaped stanzas too (trainer.data.stanza_poems)")
    parser.add_argument("--val-poems", type=int, default=0, help="keep only the first N held-out poems (0: all)")
    parser.add_argument("--xz", action="store_true", help="compress the file (load_pack reads it back as it is)")


def main(args: argparse.Namespace) -> int:
    meta = pack_corpus(args.corpus, Path(args.out), args.val_percent, args.min_count, args.max_vocab, args.include_ci,
                       val_poems=args.val_poems, xz=args.xz, include_stanzas=args.include_stanzas)
    size = Path(args.out).stat().st_size
    print(json.dumps({"out": args.out, "bytes": size, "vocab": len(meta["vocab"]), "train_poems": meta["train_poems"],
                      "val_poems": meta["val_poems"], "stanzas": meta["stanzas"],
                      "corpus_hash": meta["corpus_hash"]}))
    return 0
