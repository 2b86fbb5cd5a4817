"""Training throughput: our bucketed trainer against the classic pre-padded recipe, same model, same run.

    python -m trainer bench [--seconds 30] [--cell lstm] [--corpus DIR ...]

Both sides are real `Trainer.train_step` calls on the same corpus, the same vocabulary and the same
model size (by default the classic one: Embedding 128 → 2-layer LSTM 256 → Linear):
- ours: poems bucketed by form, `--batch-tokens` tokens a batch, nothing padded;
- classic: every poem pre-padded to 125 tokens, batches of 128 poems, loss over every position, Adam 1e-3.
The score is *useful* tokens per second: targets that are poem text or <eos>, never padding (and not the
classic recipe's form token, which it predicts from padding). The two run in alternating slices so that
a change in machine load hits both alike; warm-up steps are not timed. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from engine.poem.vocab import Vocab
from trainer.corpus import Corpus, load_corpus
from trainer.train import TrainConfig, Trainer

TARGET_RATIO = 2.0


def useful_tokens(batch: torch.Tensor, vocab: Vocab) -> int:
    """Targets that are text (，。 and Han characters, <unk> included) or <eos>: what a poem asks to predict."""
    target = batch[:, 1:]
    text = (target >= min(vocab.comma_id, vocab.period_id)) | (target == vocab.unk_id) | (target == vocab.eos_id)
    return int(text.sum())


class _Side:
    """One recipe's trainer, its batches (cycled) and its timed totals."""

    def __init__(self, name: str, trainer: Trainer):
        self.name, self.trainer = name, trainer
        self.batches = trainer._epoch_batches(0)
        self.next = 0
        self.steps = self.useful = self.computed = 0
        self.seconds = 0.0
        self.lr = trainer.cfg.lr

    def step(self) -> tuple[int, int]:
        batch = self.batches[self.next % len(self.batches)]
        self.next += 1
        self.trainer.train_step(batch, self.lr)  # ends in loss.item(): the step has finished, even on CUDA
        return useful_tokens(batch, self.trainer.vocab), batch[:, 1:].numel()

    def run_for(self, seconds: float, min_steps: int = 1):
        t0 = time.perf_counter()
        n = 0
        while n < min_steps or time.perf_counter() - t0 < seconds:
            useful, computed = self.step()
            self.useful += useful
            self.computed += computed
            n += 1
        self.seconds += time.perf_counter() - t0
        self.steps += n

    def report(self, extra: dict) -> dict:
        return {**extra, "steps": self.steps, "seconds": round(self.seconds, 3),
                "useful_tokens": self.useful, "computed_tokens": self.computed,
                "padding_share": round(1 - self.useful / self.computed, 4) if self.computed else None,
                "ms_per_step": round(1000 * self.seconds / self.steps, 2) if self.steps else None,
                "useful_tokens_per_s": round(self.useful / self.seconds, 1) if self.seconds else None}


def run_bench(corpus: Corpus, corpus_paths: list[str], seconds: float = 30.0, cell: str = "lstm",
              embed_dim: int = 128, hidden_dim: int = 256, num_layers: int = 2, batch_tokens: int = 4096,
              batch_size: int = 128, warmup_steps: int = 3, rounds: int = 3, threads: int = 0,
              device: str = "auto", min_count: int = 5, max_vocab: int = 6000) -> dict:
    """Measure both recipes for `seconds` each (in `rounds` alternating slices); returns the JSON dict."""
    with tempfile.TemporaryDirectory(prefix="yinshi-bench-") as tmp:
        common = dict(corpus=corpus_paths, cell=cell, embed_dim=embed_dim, hidden_dim=hidden_dim,
                      num_layers=num_layers, dropout=0.0, threads=threads, device=device, min_count=min_count,
                      max_vocab=max_vocab, eval_poems=1)
        quiet = lambda m: None  # noqa: E731
        ours = _Side("ours", Trainer(TrainConfig(out=str(Path(tmp) / "ours"), recipe="bucketed",
                                                 batch_tokens=batch_tokens, lr=3e-3, **common), log=quiet, corpus=corpus))
        classic = _Side("classic", Trainer(TrainConfig(out=str(Path(tmp) / "classic"), recipe="classic",
                                                       batch_size=batch_size, lr=1e-3, **common), log=quiet, corpus=corpus))
        for side in (ours, classic):
            for _ in range(warmup_steps):
                side.step()
        for _ in range(rounds):
            for side in (ours, classic):
                side.run_for(seconds / rounds)
        model = ours.trainer.model
        result = {
            "device": str(ours.trainer.device),
            "threads": torch.get_num_threads(),
            "model": {"cell": cell, "embed_dim": embed_dim, "hidden_dim": hidden_dim, "num_layers": num_layers,
                      "vocab_size": len(ours.trainer.vocab), "parameters": model.num_parameters()},
            "corpus_hash": corpus.digest(),
            "train_poems": ours.trainer.num_train_poems,
            "warmup_steps": warmup_steps,
            "ours": ours.report({"recipe": "bucketed by form, no padding", "batch_tokens": batch_tokens}),
            "classic": classic.report({"recipe": "pre-padded to 125, loss over all positions",
                                       "batch_size": batch_size}),
        }
    a, b = result["ours"]["useful_tokens_per_s"], result["classic"]["useful_tokens_per_s"]
    result["ratio"] = round(a / b, 3) if a and b else None
    result["target_ratio"] = TARGET_RATIO
    result["meets_target"] = bool(result["ratio"] and result["ratio"] >= TARGET_RATIO)
    return result


# -- command line -------------------------------------------------------------------------------------------
def add_arguments(p):
    p.add_argument("--corpus", nargs="+", default=[os.environ.get("CORPUS_DIR", "../shared/corpus/chinese-poetry")],
                   help="corpus directories or files (default $CORPUS_DIR or ../shared/corpus/chinese-poetry)")
    p.add_argument("--seconds", type=float, default=30.0, help="timed seconds per recipe (default 30)")
    p.add_argument("--cell", default="lstm", choices=("rnn", "lstm", "gru"))
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--batch-tokens", type=int, default=4096, help="our batch size in tokens (default 4096)")
    p.add_argument("--batch-size", type=int, default=128, help="the classic batch size in poems (default 128)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps per recipe first (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed slices per recipe (default 3)")
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default=os.environ.get("DEVICE", "auto"), help="auto | cpu | cuda")


def main(args) -> int:
    if args.seconds <= 0 or args.rounds < 1 or args.warmup_steps < 0:
        raise ValueError("--seconds must be positive, --rounds at least 1, --warmup-steps not negative")
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(args.corpus)
    result = run_bench(corpus, args.corpus, seconds=args.seconds, cell=args.cell, embed_dim=args.embed_dim,
                       hidden_dim=args.hidden_dim, num_layers=args.num_layers, batch_tokens=args.batch_tokens,
                       batch_size=args.batch_size, warmup_steps=args.warmup_steps, rounds=args.rounds,
                       threads=args.threads, device=args.device, min_count=args.min_count)
    print(json.dumps(result, ensure_ascii=False))
    return 0
