"""A blind panel: held-out poems by poets, shuffled with generated poems of the same form and opening
character, for a reader to score without knowing which is which.

    python -m trainer panel make --corpus ../shared/corpus/chinese-poetry --n 16 --out runs/panel \\
        --system gru-sample=engine/checkpoints/gru.safetensors:sample --system gru-greedy=…:greedy
    # the reader gets runs/panel/poems.txt only and answers with runs/panel/scores.json:
    #   [{"id": 1, "通顺": 4, "连贯": 3, "意义": 3, "诗意": 3, "human": true}, …]
    python -m trainer panel score --out runs/panel

Poets' poems come from the held-out split (never trained on), one per opening character, spread over
the four forms (`--seed` other than 0 draws other ones); each system writes one poem per held-out poem with that poem's form and first character.
`key.json` says who wrote what; `score` prints per source the mean of the four scores and the share taken
for human. The dimensions are those of the Jiuge/PQED evaluations: 通顺 fluency, 连贯 coherence, 意义
meaningfulness, 诗意 poeticness, each 1–5.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from engine.api import PoemRequest
from engine.files import atomic_write_bytes
from engine.model.checkpoint import load_checkpoint
from engine.poem.forms import FORM_NAMES
from engine.poem.prosody import prosody_for
from engine.poem.known_lines import KnownLines
from engine.reference import generate_one
from trainer.quality import held_out_poems

DIMENSIONS = ("通顺", "连贯", "意义", "诗意")
INSTRUCTIONS = """请逐首阅读下列古诗（其中有的出自诗人，有的由程序写成，顺序已打乱），按 1–5 分评价每首的
通顺、连贯、意义、诗意，并判断它出自诗人（human: true）还是程序（human: false）。
Read each poem below (some by poets, some by a program, shuffled). Score each 1–5 on 通顺 (fluency),
连贯 (coherence), 意义 (meaningfulness) and 诗意 (poeticness), and guess whether a poet wrote it.
Answer with JSON only: [{"id": 1, "通顺": 4, "连贯": 3, "意义": 3, "诗意": 3, "human": true}, …]
"""


def parse_system(text: str) -> tuple[str, str, str]:
    """"name=checkpoint:mode" → (name, checkpoint, mode)."""
    name, _, rest = text.partition("=")
    path, _, mode = rest.rpartition(":")
    if not name or not path or mode not in ("greedy", "sample", "beam"):
        raise ValueError(f"--system {text!r}: expected NAME=CHECKPOINT:greedy|sample|beam")
    return name, path, mode


def make(corpus: list[str], systems: list[str], n: int, out: Path, seed: int = 0, known_lines: str | None = None) -> dict:
    """Write the panel; `known_lines`: a table the systems decode with, as an engine serving it does."""
    parsed = [parse_system(s) for s in systems]
    known = KnownLines.load(known_lines) if known_lines else None
    rng = random.Random(seed)
    # Seed 0: the first held-out poems in their fixed order; another seed draws others, so each panel
    # can meet new poets' poems and new openings.
    pool = held_out_poems(corpus, 20 * n if seed == 0 else 400 * n)
    if seed:
        random.Random(seed).shuffle(pool)
    humans, seen = [], set()
    for form in FORM_NAMES * n:  # the forms in turn, one poem per new opening character
        pick = next((p for p in pool if p.form == form and p.text[0] not in seen), None)
        if pick is not None and len(humans) < n:
            humans.append(pick)
            seen.add(pick.text[0])
    entries = [{"source": "human", "form": p.form, "opening": p.text[0], "poem": p.text} for p in humans]
    for name, path, mode in parsed:
        ckpt = load_checkpoint(path)
        prosody = prosody_for(ckpt.vocab)
        for i, p in enumerate(humans):
            request = PoemRequest(prompt=p.text[0], form=p.form, mode=mode, seed=seed * 1000 + i)
            result = generate_one(ckpt.model, ckpt.vocab, prosody, request, known_lines=known)
            entries.append({"source": name, "form": p.form, "opening": p.text[0], "poem": result.poem})
    rng.shuffle(entries)
    for i, e in enumerate(entries, 1):
        e["id"] = i
    out.mkdir(parents=True, exist_ok=True)
    lines = [INSTRUCTIONS] + [f"{e['id']}. {e['poem']}" for e in entries]
    atomic_write_bytes(out / "poems.txt", ("\n".join(lines) + "\n").encode())
    atomic_write_bytes(out / "key.json", json.dumps(entries, ensure_ascii=False, indent=1).encode())
    return {"poems": len(entries), "human": len(humans), "systems": [s[0] for s in parsed]}


def score(out: Path) -> dict:
    key = {e["id"]: e for e in json.loads((out / "key.json").read_text())}
    scores = json.loads((out / "scores.json").read_text())
    by_source: dict[str, list[dict]] = {}
    for s in scores:
        entry = key.get(s.get("id"))
        if entry is None or not all(isinstance(s.get(d), (int, float)) and 1 <= s[d] <= 5 for d in DIMENSIONS):
            raise ValueError(f"scores.json: a bad entry {s!r}")
        by_source.setdefault(entry["source"], []).append(s)
    if len(scores) != len(key):
        raise ValueError(f"scores.json scores {len(scores)} poems; the panel has {len(key)}")
    report = {}
    for source, rows in sorted(by_source.items()):
        report[source] = {"poems": len(rows),
                          **{d: round(sum(r[d] for r in rows) / len(rows), 2) for d in DIMENSIONS},
                          "mean": round(sum(r[d] for r in rows for d in DIMENSIONS) / (4 * len(rows)), 2),
                          "taken_for_human": round(sum(bool(r.get("human")) for r in rows) / len(rows), 2)}
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="panel_command", required=True)
    p = sub.add_parser("make", help="write poems.txt (for the reader) and key.json")
    p.add_argument("--corpus", nargs="+", default=["../shared/corpus/chinese-poetry"])
    p.add_argument("--system", action="append", required=True, metavar="NAME=CHECKPOINT:MODE")
    p.add_argument("--n", type=int, default=16, help="held-out poems (and poems per system)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--known-lines", default=None, metavar="PATH",
                   help="decode with this known-lines table, as the engine does (python -m trainer corpus lines)")
    p = sub.add_parser("score", help="means per source from the reader's scores.json")
    p.add_argument("--out", required=True)


def main(args: argparse.Namespace) -> int:
    try:
        if args.panel_command == "make":
            report = make(args.corpus, args.system, args.n, Path(args.out), args.seed, args.known_lines)
        else:
            report = score(Path(args.out))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, ensure_ascii=False, indent=1))
    return 0
