"""Derive the tunes (词牌) of engine/poem/tunes.json from the Song ci corpus, and print their table.

    python -m trainer tunes derive --corpus ../shared/corpus/chinese-poetry --out engine/poem/tunes.json --top 40
    python -m trainer tunes table [--tunes engine/poem/tunes.json]       (the Markdown table of docs/CI.md)
    python -m trainer tunes check --corpus ../shared/corpus/chinese-poetry [--split val]   (check_ci on real ci)

Only training-split poems (trainer.corpus.split_of(text) == "train") are read, so the held-out poems stay
out. The rules and thresholds are the constants below; docs/CI.md explains them. The JSON holds patterns and
statistics only, never poem text.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from engine.poem.rhymes import LEVEL, OBLIQUE, cilin_groups, pingshui_table
from engine.poem.tunes import FREE_MARK, LEVEL_MARK, MARK_OF, OBLIQUE_MARK
from engine.poem.vocab import to_simplified
from trainer.corpus import CorpusError, normalise, read_records, split_of

CI_GLOB = "ci.song.*.json"
EXCLUDED_NAMES = ("失调名",)  # "tune name lost": not a tune
RHYME_PAIR = 0.5  # two line ends rhyme together when their last characters share a 词林 部 in ≥ this share of poems
RHYME_LINE = 0.6  # …and a line end stays in its set only when its mean share with the set's other ends is ≥ this
TONE_STRONG = 0.85  # a position's tone is strong when ≥ this share of its known single-reading characters agree
TONE_MIN_KNOWN = 8  # … and at least this many poems have a single-reading character there
STANZA_EVEN = 0.1  # the fallback break leaves each stanza within 10 % of half the characters (40–60 %)
MIN_MAIN = 20  # a tune is kept only when its main variant has at least this many poems
LINE_MARK = re.compile(r"([^，。、？！；：]+)([，。、？！；：]?)")


# -- reading -------------------------------------------------------------------------------------------------

def ci_files(corpus: str | Path) -> list[Path]:
    p = Path(corpus)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise CorpusError(f"{p}: no such file or directory")
    files = sorted(set(p.glob(CI_GLOB)) | set(p.glob(f"*/{CI_GLOB}")))
    if not files:
        raise CorpusError(f"{p}: no {CI_GLOB} files (the Song ci of chinese-poetry, 宋词/)")
    return files


def read_ci(files: Iterable[Path], split: str = "train") -> list[tuple[str, str]]:
    """(raw tune name, normalised text) of every ci of `split` ("train" or "val"), deduplicated by text."""
    out, seen = [], set()
    for f in files:
        for record in read_records(f):
            poem, _ = normalise(record)
            name = record.get("rhythmic") if isinstance(record, dict) else None
            if poem is None or not isinstance(name, str) or poem.text in seen:
                continue
            seen.add(poem.text)
            if split_of(poem.text) == split:
                out.append((to_simplified(name.strip()), poem.text))
    return out


def canonical_names(raw_names: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(raw name → tune name, alias → tune name). The corpus writes a tune's other name as "alias・name":
    such a poem is the tune `name`, and `alias` alone (when it is more often written so than as a tune of
    its own) is the same tune. Names with □ and 失调名 are dropped."""
    counts = Counter(raw_names)
    votes: dict[str, Counter] = defaultdict(Counter)
    mapping: dict[str, str] = {}
    for raw, n in counts.items():
        if "□" in raw or raw in EXCLUDED_NAMES or not raw:
            continue
        parts = [p.strip() for p in re.split(r"[・·•]", raw) if p.strip()]
        if not parts:
            continue
        mapping[raw] = parts[-1]
        for alias in parts[:-1]:
            votes[alias][parts[-1]] += n
    own = Counter()
    for raw, name in mapping.items():
        own[name] += counts[raw]
    aliases = {}
    for alias, targets in votes.items():
        target, _ = min(targets.items(), key=lambda kv: (-kv[1], kv[0]))
        if alias != target and own.get(alias, 0) < own[target]:
            aliases[alias] = target
    for raw, name in list(mapping.items()):
        if name in aliases and own[name] < own[aliases[name]]:
            mapping[raw] = aliases[name]
    return mapping, aliases


def segments(text: str) -> list[tuple[str, str]]:
    """(line, normalised mark) pairs; a line with no mark after it (the text's end) gets 。."""
    return [(line, MARK_OF.get(mark, "。")) for line, mark in LINE_MARK.findall(text) if line]


# -- the pattern of one tune ---------------------------------------------------------------------------------

def _single_tone(ch: str) -> str | None:
    info = pingshui_table().get(ch)
    if info is None or info.level == info.oblique:
        return None
    return LEVEL_MARK if info.level else OBLIQUE_MARK


def _bu(ch: str) -> frozenset[str]:
    return frozenset(g[:-1] for g in cilin_groups(ch))  # "第一部平" → "第一部"


def _rhyme_sets(poems: list[list[tuple[str, str]]], n: int) -> tuple[list[list[int]], dict[int, float]]:
    """Line ends that rhyme, clustered by average linkage on the share of poems in which two line ends'
    characters share a 词林 部 (merging while that share is ≥ RHYME_PAIR). A line end whose mean share with
    the rest of its cluster is below RHYME_LINE rhymes only sometimes (水龙吟's 换头, about half the poems) and is
    taken out; clusters of one are no rhyme."""
    ends = [[_bu(p[j][0][-1]) for j in range(n)] for p in poems]
    score = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            known = [(e[i], e[j]) for e in ends if e[i] and e[j]]
            share = sum(bool(a & b) for a, b in known) / len(known) if known else 0.0
            score[i][j] = score[j][i] = share
    clusters = [[i] for i in range(n)]

    def link(a, b):
        return sum(score[i][j] for i in a for j in b) / (len(a) * len(b))

    while True:
        best = max(((link(a, b), x, y) for x, a in enumerate(clusters) for y, b in enumerate(clusters) if x < y),
                   default=None)
        if best is None or best[0] < RHYME_PAIR:
            break
        _, x, y = best
        clusters[x] = sorted(clusters[x] + clusters[y])
        del clusters[y]
    sets = []
    for c in clusters:
        while len(c) > 1:
            mean = {i: sum(score[i][j] for j in c if j != i) / (len(c) - 1) for i in c}
            weakest = min(c, key=lambda i: (mean[i], -i))
            if mean[weakest] >= RHYME_LINE:
                break
            c = [i for i in c if i != weakest]
        if len(c) > 1:
            sets.append(c)
    sets.sort(key=lambda c: c[0])
    share = {i: sum(score[i][j] for j in c if j != i) / (len(c) - 1) for c in sets for i in c}
    return sets, share


def _end_tone(poems: list[list[tuple[str, str]]], j: int) -> int:
    """LEVEL or OBLIQUE: what most known single-reading characters at line end j are."""
    c = Counter(_single_tone(p[j][0][-1]) for p in poems)
    return LEVEL if c[LEVEL_MARK] >= c[OBLIQUE_MARK] else OBLIQUE


def stanza_break(lengths: list[int], marks: list[str], rhymes: list[bool]) -> int:
    """Where the first stanza ends: the line end k (a 。 that rhymes, else any 。, else any) that maximises
    (characters of the longest common suffix of lengths[:k] and lengths[k:]) − |chars before − chars after|,
    since a 下阕 repeats its 上阕 after a changed opening (换头); ties go to the most even split. When no
    candidate scores above 0 (no repeat: 诉衷情 7,5,6,5 | 3,3,3,4,4,4), the most even candidate is the break if
    it leaves both stanzas within STANZA_EVEN of half the characters; otherwise the tune is single-stanza
    (如梦令): len(lengths)."""
    n = len(lengths)
    total = sum(lengths)
    candidates = [k for k in range(1, n) if marks[k - 1] == "。" and rhymes[k - 1]] or \
                 [k for k in range(1, n) if marks[k - 1] == "。"] or list(range(1, n))

    def score(k):
        first, second = lengths[:k], lengths[k:]
        same = 0
        for a, b in zip(reversed(first), reversed(second)):
            if a != b:
                break
            same += a
        before = sum(first)
        return same - abs(before - (total - before)), -abs(2 * before - total), -k

    best = max(candidates, key=score, default=n)
    if best < n and score(best)[0] > 0:
        return best
    even = max(candidates, key=lambda k: (-abs(2 * sum(lengths[:k]) - total), -k), default=n)
    return even if even < n and abs(2 * sum(lengths[:even]) - total) <= 2 * STANZA_EVEN * total else n


def derive_tune(name: str, texts: list[str]) -> dict | None:
    """The pattern and statistics of one tune from its poems' texts (JSON-ready; no poem text in it)."""
    parsed = [segments(t) for t in texts]
    parsed = [p for p in parsed if p]
    if not parsed:
        return None
    sequences = Counter(tuple(len(line) for line, _ in p) for p in parsed)
    main, count = min(sequences.items(), key=lambda kv: (-kv[1], kv[0]))
    poems = [p for p in parsed if tuple(len(line) for line, _ in p) == main]
    n = len(main)
    mark_counts = [Counter(p[j][1] for p in poems) for j in range(n)]
    marks = [min(c.items(), key=lambda kv: (-kv[1], kv[0] != "。"))[0] for c in mark_counts]
    sets, rhyme_share = _rhyme_sets(poems, n)
    # A set whose line ends are of both tones (西江月: 平 and 仄 of one 部) becomes a 平 set and a 仄 set.
    # The two keep a link: their rhymes come from one 部 (`same_bu`).
    split_sets: list[tuple[list[int], int, int]] = []  # (lines, tone, the set it came from)
    for origin, members in enumerate(sets):
        by_tone: dict[int, list[int]] = defaultdict(list)
        for j in members:
            by_tone[_end_tone(poems, j)].append(j)
        split_sets.extend((js, tone, origin) for tone, js in by_tone.items())
    split_sets.sort(key=lambda s: s[0][0])
    rhyme_of = {j: index for index, (js, _, _) in enumerate(split_sets) for j in js}
    same_bu = [[i for i, s in enumerate(split_sets) if s[2] == origin] for origin in range(len(sets))]
    lines, strong_shares = [], []
    for j, length in enumerate(main):
        tones, shares = [], []
        for pos in range(length):
            c = Counter(_single_tone(p[j][0][pos]) for p in poems)
            known = c[LEVEL_MARK] + c[OBLIQUE_MARK]
            top = LEVEL_MARK if c[LEVEL_MARK] >= c[OBLIQUE_MARK] else OBLIQUE_MARK
            share = c[top] / known if known else 0.0
            strong = known >= TONE_MIN_KNOWN and share >= TONE_STRONG
            tones.append(top if strong else FREE_MARK)
            shares.append(round(share, 2))
            if strong:
                strong_shares.append(share)
        lines.append({
            "tones": "".join(tones), "mark": marks[j], "rhyme": rhyme_of.get(j),
            "mark_share": round(mark_counts[j][marks[j]] / len(poems), 3),
            "rhyme_share": round(rhyme_share[j], 3) if j in rhyme_share else None,
            "tone_share": shares,
        })
    brk = stanza_break(list(main), marks, [j in rhyme_of for j in range(n)])
    return {
        "poems": len(parsed), "main": count, "agreement": round(count / len(parsed), 3), "variants": len(sequences),
        "stanza_break": brk,
        "rhyme_tones": [LEVEL_MARK if tone == LEVEL else OBLIQUE_MARK for _, tone, _ in split_sets],
        **({"same_bu": linked} if (linked := [g for g in same_bu if len(g) > 1]) else {}),
        "tone_agreement": round(sum(strong_shares) / len(strong_shares), 3) if strong_shares else 0.0,
        "lines": lines,
    }


def derive(records: Iterable[tuple[str, str]], top: int = 40, min_poems: int = 20, min_main: int = MIN_MAIN) -> dict:
    """tunes.json's content from (raw tune name, text) pairs: the `top` most common tunes (by poems, after
    grouping names) with at least `min_poems` poems and `min_main` poems of their main variant (a tune below
    that, like 洞仙歌 whose main variant is 9 %, is skipped and the next one taken), and the aliases that
    point at them."""
    records = list(records)
    mapping, aliases = canonical_names(name for name, _ in records)
    by_tune: dict[str, list[str]] = defaultdict(list)
    for raw, text in records:
        if raw in mapping:
            by_tune[mapping[raw]].append(text)
    ranked = sorted(by_tune.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    tunes = {}
    for name, texts in ranked:
        if len(tunes) >= top or len(texts) < min_poems:
            break
        derived = derive_tune(name, texts)
        if derived and derived["main"] >= min_main:
            tunes[name] = derived
    kept_aliases = {a: t for a, t in sorted(aliases.items()) if t in tunes and a not in tunes}
    raw_aliases = {raw: name for raw, name in sorted(mapping.items())
                   if name in tunes and raw != name and "・" not in raw and raw not in tunes}
    return {
        "version": 1,
        "source": "chinese-poetry 宋词 ci.song.*.json, training split only (trainer.corpus.split_of)",
        "thresholds": {"rhyme_pair": RHYME_PAIR, "rhyme_line": RHYME_LINE, "tone_strong": TONE_STRONG, "tone_min_known": TONE_MIN_KNOWN,
                       "stanza_even": STANZA_EVEN, "min_main": min_main},
        "aliases": {**kept_aliases, **raw_aliases},
        "tunes": tunes,
    }


def dumps(data: dict) -> str:
    """Compact, deterministic JSON: one tune a line."""
    def j(x):
        return json.dumps(x, ensure_ascii=False, separators=(",", ":"))

    head = {k: v for k, v in data.items() if k != "tunes"}
    parts = [f"{j(k)}:{j(v)}" for k, v in head.items()]
    tunes = ",\n".join(f"{j(name)}:{j(t)}" for name, t in data["tunes"].items())
    return "{" + ",\n".join(parts) + ',\n"tunes":{\n' + tunes + "\n}}\n"


# -- the table -----------------------------------------------------------------------------------------------

def table(path: str | Path) -> str:
    """The Markdown table of docs/CI.md from a tunes.json."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = ["| tune | poems | agreement | lines (上阕 \\| 下阕) | rhyme sets | tone agreement | strong positions |",
            "| --- | ---: | ---: | --- | --- | ---: | ---: |"]
    for name, t in data["tunes"].items():
        lengths = [len(line["tones"]) for line in t["lines"]]
        k = t["stanza_break"]
        shape = ",".join(map(str, lengths[:k])) + (" \\| " + ",".join(map(str, lengths[k:])) if k < len(lengths) else "")
        sets = " ".join(f"{tone}{''.join(str(i + 1) for i, line in enumerate(t['lines']) if line['rhyme'] == s)}"
                        if len(t["lines"]) < 10 else
                        f"{tone}(" + ",".join(str(i + 1) for i, line in enumerate(t["lines"]) if line["rhyme"] == s) + ")"
                        for s, tone in enumerate(t["rhyme_tones"]))
        strong = sum(ch != FREE_MARK for line in t["lines"] for ch in line["tones"])
        chars = sum(lengths)
        rows.append(f"| {name} | {t['poems']} | {t['agreement']:.0%} | {shape} | {sets} | "
                    f"{t['tone_agreement']:.0%} | {strong}/{chars} |")
    return "\n".join(rows) + "\n"


def corpus_check(records: Iterable[tuple[str, str]], tunes: dict) -> dict:
    """How the corpus's own poems fare under check_ci, per tune: poems, the share with the tune's structure,
    and among those the share whose rhymes pass and their mean tone agreement (a baseline for generated ci)."""
    from engine.poem.tunes import check_ci

    records = list(records)
    mapping, _ = canonical_names(name for name, _ in records)
    stats: dict[str, list] = {name: [0, 0, 0, 0.0] for name in tunes}
    for raw, text in records:
        tune = tunes.get(mapping.get(raw, ""))
        if tune is None:
            continue
        row = stats[tune.name]
        row[0] += 1
        result = check_ci(tune, text)
        if result.structure_ok:
            row[1] += 1
            row[2] += result.rhyme_ok
            row[3] += result.tone_agreement
    return {name: {"poems": n, "structure_ok": round(s / n, 3) if n else None,
                   "rhyme_ok": round(r / s, 3) if s else None, "tone_agreement": round(t / s, 3) if s else None}
            for name, (n, s, r, t) in stats.items()}


# -- command line --------------------------------------------------------------------------------------------

def add_arguments(p):
    sub = p.add_subparsers(dest="tunes_command", required=True)
    d = sub.add_parser("derive", help="derive the tunes' patterns from the Song ci (training split) into JSON")
    d.add_argument("--corpus", required=True, help="chinese-poetry directory (or its 宋词/ folder, or one file)")
    d.add_argument("--out", default="engine/poem/tunes.json")
    d.add_argument("--top", type=int, default=40, help="how many of the most common tunes (default 40)")
    d.add_argument("--min-poems", type=int, default=20, help="skip tunes with fewer poems (default 20)")
    d.add_argument("--min-main", type=int, default=MIN_MAIN,
                   help=f"skip tunes whose main variant has fewer poems (default {MIN_MAIN})")
    t = sub.add_parser("table", help="the Markdown table of the tunes (docs/CI.md)")
    t.add_argument("--tunes", default="engine/poem/tunes.json")
    c = sub.add_parser("check", help="check_ci on the corpus's own poems, per tune (JSON): a baseline")
    c.add_argument("--corpus", required=True)
    c.add_argument("--split", choices=("train", "val"), default="val", help="which split's poems (default val)")
    c.add_argument("--tunes", default="engine/poem/tunes.json")


def main(args) -> int:
    if args.tunes_command == "table":
        print(table(args.tunes), end="")
        return 0
    if args.tunes_command == "check":
        from engine.poem.tunes import load_tunes

        tunes, _ = load_tunes(args.tunes)
        result = corpus_check(read_ci(ci_files(args.corpus), split=args.split), tunes)
        print(json.dumps(result, ensure_ascii=False, indent=1))
        return 0
    if min(args.top, args.min_poems, args.min_main) < 1:
        raise ValueError("--top, --min-poems and --min-main must be at least 1")
    data = derive(read_ci(ci_files(args.corpus)), top=args.top, min_poems=args.min_poems, min_main=args.min_main)
    if not data["tunes"]:
        raise CorpusError(f"{args.corpus}: no tune with at least {args.min_poems} training poems")
    Path(args.out).write_text(dumps(data), encoding="utf-8")
    summary = {name: [t["poems"], t["agreement"]] for name, t in data["tunes"].items()}
    print(json.dumps({"tunes": len(summary), "out": str(args.out), "summary": summary}, ensure_ascii=False))
    return 0
