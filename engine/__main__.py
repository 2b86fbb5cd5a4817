"""Engine command line. Each subcommand lives in the module that does the work:

    python -m engine generate 月 [--form qijue --mode beam --beam-width 5]   (engine.decoding)
    python -m engine evaluate [--poems-per-cell 20]                        (engine.quality)
    python -m engine serve [--host 127.0.0.1 --port 8080 --checkpoints DIR] (engine.service)
    python -m engine bench [--concurrency 1 16 64 256]                     (engine.bench)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand → (module, help). Each module defines add_arguments(parser) and main(args) -> int.
COMMANDS = {
    "generate": ("engine.decoding", "write one poem and print it"),
    "evaluate": ("engine.quality", "quality report: form, rhyme, tone, repetition, copying, speed"),
    "serve": ("engine.service", "run the HTTP service"),
    "bench": ("engine.bench", "throughput and latency benchmark (JSON and a table)"),
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
