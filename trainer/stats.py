"""What the corpus holds: poems per form and source, dropped records and why, characters and their frequency.

    python -m trainer corpus stats [--corpus DIR ...] [--top 50] [--json] [--plot docs/corpus_stats.png]

The character counts are over the normalised (simplified) poem text, Han characters only. Coverage is
the share of all character occurrences that the k most frequent characters account for: it says how
large a vocabulary must be before <unk> becomes rare. `--plot` draws rank against frequency on log-log
axes (a Zipf-like line) and the form mix per source.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

from engine.poem.forms import FORM_NAMES
from engine.poem.vocab import is_han
from trainer.corpus import Corpus, load_corpus

COVERAGE_AT = (1000, 3000, 5000)
# Matplotlib's bundled font has no Han glyphs; the plot names these sources in ASCII.
PLOT_LABELS = {"唐诗三百首": "tang300", "唐詩三百首": "tang300", "宋词三百首": "songci300"}
FORM_ORDER = (*FORM_NAMES, "other")


def corpus_stats(corpus: Corpus, top: int = 50) -> dict:
    """The numbers `corpus stats` prints, as one JSON-able dict."""
    by_source: dict[str, Counter] = {}
    for p in corpus.poems:
        by_source.setdefault(p.source, Counter())[p.form] += 1
    forms = Counter(p.form for p in corpus.poems)
    chars = Counter(ch for p in corpus.poems for ch in p.text if is_han(ch))
    regular_chars = Counter(ch for p in corpus.poems if p.form != "other" for ch in p.text if is_han(ch))
    total = sum(chars.values())
    ranked = chars.most_common()
    coverage = {}
    for k in COVERAGE_AT:
        coverage[str(k)] = round(sum(n for _, n in ranked[:k]) / total, 4) if total else 0.0
    return {
        "files": len(corpus.files),
        "poems": len(corpus.poems),
        "regular_poems": sum(n for f, n in forms.items() if f != "other"),
        "forms": {f: forms.get(f, 0) for f in FORM_ORDER},
        "sources": {s: {f: c.get(f, 0) for f in FORM_ORDER} | {"total": sum(c.values())}
                    for s, c in sorted(by_source.items())},
        "dropped": dict(corpus.dropped.most_common()),
        "characters": total,
        "vocab_size": len(chars),
        "regular_vocab_size": len(regular_chars),
        "singletons": sum(1 for n in chars.values() if n == 1),
        "coverage": coverage,
        "top": [[ch, n, round(n / total, 5)] for ch, n in ranked[:top]],
        "corpus_hash": corpus.digest(),
        "_counts": [n for _, n in ranked],  # for the plot; dropped from the printed JSON
    }


def format_report(stats: dict) -> str:
    lines = [f"{stats['poems']:,} poems from {stats['files']} files ({stats['regular_poems']:,} in the four "
             f"regular forms); corpus hash {stats['corpus_hash']}", ""]
    width = max(len(s) for s in stats["sources"]) if stats["sources"] else 6
    lines.append(f"{'source':<{width}}  " + "  ".join(f"{f:>7}" for f in FORM_ORDER) + f"  {'total':>8}")
    for source, row in stats["sources"].items():
        lines.append(f"{source:<{width}}  " + "  ".join(f"{row[f]:>7,}" for f in FORM_ORDER) + f"  {row['total']:>8,}")
    lines.append(f"{'all':<{width}}  " + "  ".join(f"{stats['forms'][f]:>7,}" for f in FORM_ORDER)
                 + f"  {stats['poems']:>8,}")
    lines.append("")
    dropped = stats["dropped"]
    lines.append(f"dropped {sum(dropped.values()):,} records: "
                 + (", ".join(f"{why} {n:,}" for why, n in dropped.items()) or "none"))
    cov = ", ".join(f"top {int(k):,}: {v:.2%}" for k, v in stats["coverage"].items())
    lines.append(f"{stats['characters']:,} Han characters, {stats['vocab_size']:,} distinct "
                 f"({stats['regular_vocab_size']:,} in regular-form poems, {stats['singletons']:,} seen once)")
    lines.append(f"coverage: {cov}")
    lines.append("")
    lines.append(f"most frequent {len(stats['top'])}:")
    row = []
    for i, (ch, n, share) in enumerate(stats["top"], 1):
        row.append(f"{i:>3} {ch} {n:>8,} {share:6.2%}")
        if len(row) == 5:
            lines.append("   ".join(row))
            row = []
    if row:
        lines.append("   ".join(row))
    return "\n".join(lines)


def plot_stats(stats: dict, path) -> None:
    """Rank/frequency on log-log axes and the form mix per source, written atomically as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = stats["_counts"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.loglog(range(1, len(counts) + 1), counts, lw=1.5)
    for i, k in enumerate(COVERAGE_AT):
        if k <= len(counts):
            ax1.axvline(k, color="grey", ls=":", lw=1)
            # Staggered down the axis: the marks sit close together on a log scale.
            ax1.text(k, counts[0] * 0.25**i, f" top {k // 1000}k: {stats['coverage'][str(k)]:.1%}",
                     fontsize=8, va="top", ha="right")
    ax1.set_xlabel("rank")
    ax1.set_ylabel("occurrences")
    ax1.set_title(f"character frequency ({stats['vocab_size']:,} distinct)")
    ax1.grid(alpha=0.3, which="both")

    sources = list(stats["sources"])
    bottom = [0] * len(sources)
    for form in FORM_ORDER:
        values = [stats["sources"][s][form] for s in sources]
        ax2.bar(sources, values, bottom=bottom, label=form)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax2.set_xticks(range(len(sources)), [PLOT_LABELS.get(s, s) for s in sources])
    ax2.set_ylabel("poems")
    ax2.set_title("form mix per source")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


# -- command line -------------------------------------------------------------------------------------------
def add_arguments(p):
    p.add_argument("--corpus", nargs="+", default=[os.environ.get("CORPUS_DIR", "../shared/corpus/chinese-poetry")],
                   help="corpus directories or files (default $CORPUS_DIR or ../shared/corpus/chinese-poetry)")
    p.add_argument("--include-ci", action="store_true", help="count 宋词 (ci) too")
    p.add_argument("--top", type=int, default=50, help="most frequent characters to list (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="draw the frequency distribution and the form mix")


def main(args) -> int:
    corpus = load_corpus(args.corpus, include_ci=args.include_ci)
    stats = corpus_stats(corpus, top=args.top)
    if args.plot:
        plot_stats(stats, args.plot)
    public = {k: v for k, v in stats.items() if not k.startswith("_")}
    print(json.dumps(public, ensure_ascii=False) if args.json else format_report(public))
    if args.plot:
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
