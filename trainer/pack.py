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
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from engine.files import atomic_write_bytes
from engine.poem.vocab import Vocab
from trainer.corpus import CorpusError, load_corpus, split
from trainer.data import Buckets, ci_poems, ci_vocab

FORMAT = "yinshi-packed-corpus"


@dataclass
class PackedCorpus:
    vocab: Vocab
    train: Buckets
    val: Buckets
    corpus_hash: str


def pack_corpus(paths: list[str], out: Path, val_percent: int = 5, min_count: int = 5, max_vocab: int = 6000,
                include_ci: bool = False, tune_tokens: int = 80) -> dict:
    """Write the packed file; returns its metadata."""
    corpus = load_corpus(paths, include_ci=include_ci)
    train, val = split(corpus.regular(), val_percent)
    if not train or not val:
        raise CorpusError(f"{', '.join(paths)}: the training or the validation split is empty")
    vocab = Vocab.build((p.text for p in train), min_count, max_vocab)
    if include_ci:
        ci_train, ci_val = split(ci_poems(corpus), val_percent)
        if not ci_train:
            raise CorpusError(f"{', '.join(paths)}: --include-ci, but the corpus holds no 词 (download them with --include-ci)")
        vocab = ci_vocab(vocab, ci_train, min_count, tune_tokens)
        train, val = train + ci_train, val + ci_val
    if len(vocab) >= 2**15:
        raise ValueError(f"a vocabulary of {len(vocab)} tokens does not fit int16")
    tensors = {f"{name}.{form}": t.to(torch.int16).contiguous()
               for name, poems in (("train", train), ("val", val))
               for form, t in Buckets.build(vocab, poems).tensors.items()}
    meta = {"format": FORMAT, "vocab": vocab.tokens, "corpus_hash": corpus.digest(), "val_percent": val_percent,
            "train_poems": len(train), "val_poems": len(val)}
    atomic_write_bytes(Path(out), save(tensors, metadata={"yinshi": json.dumps(meta, ensure_ascii=False)}))
    return meta


def load_pack(path) -> PackedCorpus:
    """Read a packed file; CorpusError naming it when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("yinshi", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
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


def main(args: argparse.Namespace) -> int:
    meta = pack_corpus(args.corpus, Path(args.out), args.val_percent, args.min_count, args.max_vocab, args.include_ci)
    size = Path(args.out).stat().st_size
    print(json.dumps({"out": args.out, "bytes": size, "vocab": len(meta["vocab"]), "train_poems": meta["train_poems"],
                      "val_poems": meta["val_poems"], "corpus_hash": meta["corpus_hash"]}))
    return 0
