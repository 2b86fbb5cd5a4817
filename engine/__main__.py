"""Engine command line. Each subcommand lives in the module that does the work:

    python -m engine generate 月 [--form qijue --mode beam --beam-width 5]   (engine.reference)
    python -m engine serve [--host 127.0.0.1 --port 8080 --checkpoints DIR] (engine.serving.service)
    python -m engine bench [--concurrency 1 16 64 256]                     (engine.serving.bench)
    python -m engine check "白日依山尽，黄河入海流。…"                      (engine.poem.meter)

The quality report, which reads the corpus, is the trainer's: python -m trainer quality.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand → (module, help). Each module defines add_arguments(parser) and main(args) -> int.
COMMANDS = {
    "generate": ("engine.reference", "write one poem and print it"),
    "serve": ("engine.serving.service", "run the HTTP service"),
    "bench": ("engine.serving.bench", "throughput and latency benchmark (JSON and a table)"),
    "check": ("engine.poem.meter", "read a pasted 绝句 or 律诗's meter: tones, rhyme, faults"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(module=module)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return importlib.import_module(args.module).main(args)


if __name__ == "__main__":
    sys.exit(main())
