"""Trainer command line.

    python -m trainer corpus download --dest data/chinese-poetry [--include-ci] [--base-url URL]
    python -m trainer corpus pack --corpus ../shared/corpus/chinese-poetry --out data/packed.safetensors
    python -m trainer corpus stats --corpus ../shared/corpus/chinese-poetry [--plot docs/corpus_stats.png]
    python -m trainer train --corpus ../shared/corpus/chinese-poetry --out runs/lstm --cell lstm --time-budget 30
    python -m trainer export --checkpoint runs/gpu/best.safetensors --out OUT --name lstm --int8   (then: join)
    python -m trainer eval --checkpoint runs/lstm/best.safetensors --poems held_out.txt
    python -m trainer quality --checkpoint engine/checkpoints/gru.safetensors --corpus ../shared/corpus/chinese-poetry --n 20
    python -m trainer panel make --n 16 --out runs/panel --system gru=engine/checkpoints/gru.safetensors:sample
    python -m trainer bench [--seconds 30] [--cell lstm]
    python -m trainer tunes derive --corpus ../shared/corpus/chinese-poetry --out engine/poem/tunes.json --top 40
    python -m trainer publish --store var/checkpoints --name lstm --checkpoint runs/lstm/best.safetensors --keep 5
    python -m trainer rollback --store var/checkpoints --name lstm [--version V]
    python -m trainer versions --store var/checkpoints --name lstm
    python -m trainer retrain [--force]        (one run: fine-tune, evaluate, publish if not worse)
    python -m trainer schedule [--once]        (the daemon: RETRAIN_CRON in TIMEZONE)

Every expected failure (a malformed or missing corpus, a bad checkpoint, a bad flag value) ends with one
`error: …` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
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
    if trainer.rank != 0:
        return 0  # under torchrun, one result line (rank 0's), as from one process
    print(json.dumps({k: result[k] for k in ("step", "epoch", "tokens", "train_seconds", "best_val_ppl", "stop_reason")}))
    return 0


def cmd_eval(args) -> int:
    from engine.model.checkpoint import load_checkpoint
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


def _module_command(module: str):
    """A subcommand whose module defines main(args) -> int (imported only when it runs)."""
    return lambda args: importlib.import_module(module).main(args)


def build_parser() -> argparse.ArgumentParser:
    from trainer import bench, download, known_lines, pack, panel, quality, stats, tunes

    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="fetch the corpus or describe it")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True)
    p = sub.add_parser("train", help="train a model (see --help for every knob)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    from trainer import export

    for name, help_text, add, func in (
        ("export", "a checkpoint as parts of at most --part-mib MiB (optionally int8)", export.add_export_arguments,
         export.export_main),
        ("join", "parts from `export` back into one verified checkpoint", export.add_join_arguments, export.join_main),
    ):
        p = sub.add_parser(name, help=help_text)
        add(p)
        p.set_defaults(func=func)
    p = sub.add_parser("eval", help="per-character perplexity of a checkpoint on a file of poems (one a line)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--poems", required=True)
    p.set_defaults(func=cmd_eval)
    for parent, name, module, help_text in (
        (corpus_sub, "download", download, "fetch the chinese-poetry files (resumable, validated)"),
        (corpus_sub, "stats", stats, "poems per form and source, characters, coverage, frequencies"),
        (corpus_sub, "pack", pack, "the training set preprocessed into one small file (for a GPU machine)"),
        (corpus_sub, "lines", known_lines, "the corpus's lines as the table of lines poems must not quote"),
        (sub, "quality", quality, "quality report: form, rhyme, tone, repetition, copying, speed"),
        (sub, "panel", panel, "a blind panel: held-out poems shuffled with generated ones, and its scores"),
        (sub, "bench", bench, "training tokens/s: ours against the classic padded recipe (JSON)"),
        (sub, "tunes", tunes, "词 tunes (词牌): derive their patterns from the Song ci, or print their table"),
    ):
        p = parent.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=_module_command(module.__name__))
    _add_publishing_commands(sub)
    return parser


def _add_publishing_commands(sub):
    """publish / rollback / versions (trainer.publish) and retrain / schedule (trainer.daemon)."""
    from trainer import daemon, publish

    for name, help_text, add, func in (
        ("publish", "copy a checkpoint into the store atomically and make it current", publish.add_publish_arguments,
         publish.publish_main),
        ("rollback", "point the store's current version back at a kept one", publish.add_rollback_arguments,
         publish.rollback_main),
        ("versions", "list the store's versions (* = current)", publish.add_versions_arguments, publish.versions_main),
        ("retrain", "one retrain run now: fine-tune, evaluate, publish if not worse", daemon.add_retrain_arguments,
         daemon.retrain_main),
        ("schedule", "the retrain daemon (RETRAIN_CRON in TIMEZONE); --once for one run", daemon.add_arguments,
         daemon.main),
    ):
        p = sub.add_parser(name, help=help_text)
        add(p)
        p.set_defaults(func=func)


def main(argv=None) -> int:
    from engine.model.checkpoint import CheckpointError
    from trainer.corpus import CorpusError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CorpusError, CheckpointError, ValueError, OSError, FloatingPointError) as e:
        # Expected failures: one line that names the file and the problem. Anything else is a bug and
        # keeps its traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
