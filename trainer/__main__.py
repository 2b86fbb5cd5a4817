"""Trainer command line.

    python -m trainer train --corpus ../shared/corpus/chinese-poetry --out runs/lstm --cell lstm --time-budget 30
    python -m trainer eval --checkpoint runs/lstm/best.safetensors --poems held_out.txt
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from trainer.train import TrainConfig


def _add_train_args(p: argparse.ArgumentParser):
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "corpus":
            p.add_argument(flag, nargs="+", help=f"corpus directories or files (default {default})")
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})")
        else:
            p.add_argument(flag, type=type(default), default=None, help=f"(default {default})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def cmd_train(args) -> int:
    from trainer.train import Trainer, config_from_args

    cfg = config_from_args(vars(args))
    trainer = Trainer(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr, flush=True))
    result = trainer.run(progress_bar=not args.no_progress)
    print(json.dumps({k: result[k] for k in ("step", "epoch", "tokens", "train_seconds", "best_val_ppl", "stop_reason")}))
    return 0


def cmd_eval(args) -> int:
    from engine.checkpoint import load_checkpoint
    from trainer.evaluate import perplexity, read_poem_lines

    ckpt = load_checkpoint(args.checkpoint)
    poems, skipped = read_poem_lines(args.poems)
    if not poems:
        raise ValueError(f"{args.poems}: no regular-form poem to evaluate ({skipped} lines skipped)")
    pre_pad = ckpt.meta.get("train", {}).get("recipe") == "classic"
    result = perplexity(ckpt.model, ckpt.vocab, poems, pre_pad=pre_pad)
    result["skipped"] = skipped
    result["checkpoint"] = {"version": ckpt.version, "cell": ckpt.model.config.cell}
    print(json.dumps(result, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (see --help for every knob)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="per-character perplexity of a checkpoint on a file of poems (one a line)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--poems", required=True)
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv=None) -> int:
    from engine.checkpoint import CheckpointError
    from trainer.corpus import CorpusError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CorpusError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
