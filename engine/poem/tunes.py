"""词牌 (tunes): each tune's line lengths, punctuation, stanza break, rhyme positions and strong tone positions,
as the Song ci corpus attests them (derived by `python -m trainer tunes derive`, see docs/CI.md), plus a
checker for a 词 written to a tune. Plain Python, no torch.

    t = parse_tune("浣溪沙")             # also traditional names and aliases: "浣溪紗", "浣沙溪"
    t.line_lengths                       # (7, 7, 7, 7, 7, 7); t.stanza_break == 3
    text = format_ci(t, lines)           # "…，…。…。\n…，…。…。"
    check_ci(t, text).ok                 # structure, rhyme (词林正韵) and tones

Rhyme sets: lines whose `rhyme` index is the same rhyme together, in one 词林正韵 group of the set's tone
(rhyme_tones[i]: rhymes.LEVEL or rhymes.OBLIQUE; 入声 rhymes are OBLIQUE). Where a tune mixes 平 and 仄 of
one 部 (西江月), the 平 line ends and the 仄 line ends are two sets.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.poem.forms import Layout
from engine.poem.rhymes import LEVEL, OBLIQUE, char_info, cilin_bu, cilin_groups, cilin_tone
from engine.poem.vocab import is_han, to_simplified

TUNES_JSON = Path(__file__).with_name("tunes.json")
LINE_MARKS = "，。、？！；："
_SPLIT = re.compile(r"[，。、？！；：,.?!;:\n]+")
MARK_OF = {"，": "，", "、": "，", "；": "，", "：": "，", "。": "。", "？": "。", "！": "。"}
LEVEL_MARK, OBLIQUE_MARK, FREE_MARK = "平", "仄", "·"


@dataclass(frozen=True)
class TuneLine:
    length: int  # Han characters
    mark: str  # "，" or "。": the corpus's majority mark at this line end (？！ → 。, ；、： → ，)
    rhyme: int | None  # index of the rhyme set this line end belongs to; None = no rhyme
    tones: str  # one char per position: "平", "仄", or "·" where the corpus does not agree strongly


@dataclass(frozen=True)
class Tune:
    name: str  # simplified, e.g. "浣溪沙"
    lines: tuple[TuneLine, ...]
    stanza_break: int  # lines in the first stanza (上阕); len(lines) if single-stanza
    rhyme_tones: tuple[int, ...]  # per rhyme set: LEVEL or OBLIQUE
    poems: int  # poems of this tune in the corpus's training split
    agreement: float  # share of them with exactly this line-length sequence (the main variant)
    tone_agreement: float  # mean agreement of the strong tone positions
    # Rhyme sets whose rhymes come from one 词林正韵 部 (西江月: its 平 set and its 仄 set, (0, 1)).
    same_bu: tuple[tuple[int, ...], ...] = ()

    @property
    def line_lengths(self) -> tuple[int, ...]:
        return tuple(line.length for line in self.lines)

    @property
    def num_chars(self) -> int:
        return sum(self.line_lengths)

    @property
    def text_len(self) -> int:
        """Characters plus one mark per line (the "\\n" of the stanza break not counted)."""
        return self.num_chars + len(self.lines)

    @property
    def stanzas(self) -> tuple[tuple[TuneLine, ...], ...]:
        if self.stanza_break >= len(self.lines):
            return (self.lines,)
        return (self.lines[:self.stanza_break], self.lines[self.stanza_break:])

    @property
    def layout(self) -> Layout:
        """Where the lines and marks lie in the text, as decoding sees it (the stanza break is not a position)."""
        return _tune_layout(self)

    def rhyme_lines(self, index: int) -> list[int]:
        """Line numbers of rhyme set `index`."""
        return [i for i, line in enumerate(self.lines) if line.rhyme == index]


@dataclass
class CiCheck:
    structure_ok: bool  # exactly the tune's line lengths
    rhyme_ok: bool  # every rhyme set's line ends share one 词林正韵 group of the set's tone
    tone_agreement: float  # share of the tune's strong tone positions the text follows
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.structure_ok and self.rhyme_ok


@functools.cache
def _tune_layout(tune: Tune) -> Layout:
    return Layout(tune.line_lengths, tuple(line.mark for line in tune.lines))


def _tune_from_json(name: str, d: dict) -> Tune:
    lines = tuple(TuneLine(length=len(line["tones"]), mark=line["mark"], rhyme=line["rhyme"], tones=line["tones"])
                  for line in d["lines"])
    return Tune(name=name, lines=lines, stanza_break=d["stanza_break"],
                rhyme_tones=tuple(LEVEL if t == LEVEL_MARK else OBLIQUE for t in d["rhyme_tones"]),
                poems=d["poems"], agreement=d["agreement"], tone_agreement=d["tone_agreement"],
                same_bu=tuple(tuple(group) for group in d.get("same_bu", ())))


def load_tunes(path: str | Path = TUNES_JSON) -> tuple[dict[str, Tune], dict[str, str]]:
    """(name → Tune, alias → name) from a tunes.json written by trainer.tunes."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    tunes = {name: _tune_from_json(name, d) for name, d in data["tunes"].items()}
    aliases = {alias: name for alias, name in data.get("aliases", {}).items() if name in tunes}
    return tunes, aliases


TUNES, ALIASES = load_tunes() if TUNES_JSON.exists() else ({}, {})


def parse_tune(name: str) -> Tune:
    """The tune named `name` (traditional or simplified, a common alias, or "name・title")."""
    raw = (name or "").strip()
    simple = to_simplified(raw) if raw else ""
    candidates = [simple] + [part.strip() for part in re.split(r"[・·•]", simple) if part.strip()]
    for candidate in candidates:
        if candidate in TUNES:
            return TUNES[candidate]
        if candidate in ALIASES:
            return TUNES[ALIASES[candidate]]
    known = "、".join(list(TUNES)[:8])
    raise ValueError(f"unknown tune {raw!r}; known tunes include {known} ({len(TUNES)} in all)")


def format_ci(tune: Tune, lines: list[str]) -> str:
    """The lines joined with the tune's marks, a newline after the first stanza's last mark."""
    if len(lines) != len(tune.lines):
        raise ValueError(f"{tune.name} has {len(tune.lines)} lines, got {len(lines)}")
    out = []
    for i, (text, line) in enumerate(zip(lines, tune.lines)):
        out.append(text + line.mark)
        if i + 1 == tune.stanza_break and i + 1 < len(tune.lines):
            out.append("\n")
    return "".join(out)


def split_ci(text: str) -> list[str]:
    """A 词's lines: split at any of ，。、？！；： and newlines (ASCII forms too), whitespace dropped."""
    return [piece for piece in (re.sub(r"\s", "", p) for p in _SPLIT.split(text)) if piece]


def _tone_matches(ch: str, mark: str) -> bool:
    info = char_info(ch)
    if info is None:
        return False
    return info.level if mark == LEVEL_MARK else info.oblique


def check_ci(tune: Tune, text: str) -> CiCheck:
    """Does `text` follow `tune`? Structure (line lengths), rhyme (each rhyme set's line ends share a 词林正韵
    group of the set's tone, and the sets of `same_bu` one 部) and the share of strong tone positions followed
    (a character with both readings matches either; one with no known tone matches neither)."""
    lines = split_ci(text)
    problems: list[str] = []
    want = tune.line_lengths
    got = tuple(len(line) for line in lines)
    structure_ok = got == want
    if not structure_ok:
        if len(got) != len(want):
            problems.append(f"{len(got)} lines, {tune.name} has {len(want)}")
        else:
            problems.extend(f"line {i + 1} has {g} characters, should have {w}"
                            for i, (g, w) in enumerate(zip(got, want)) if g != w)
    bad_chars = sorted({ch for line in lines for ch in line if not is_han(ch)})
    if bad_chars:
        problems.append(f"not Han characters: {''.join(bad_chars)}")
    rhyme_ok = len(got) == len(want)
    shared_by_set: dict[int, set[str]] = {}
    if rhyme_ok:
        for index, tone in enumerate(tune.rhyme_tones):
            members = [i for i in tune.rhyme_lines(index) if lines[i]]
            shared = None
            for i in members:
                groups = {g for g in cilin_groups(lines[i][-1]) if cilin_tone(g) == tone}
                shared = groups if shared is None else shared & groups
            if members and not shared:
                ends = "".join(lines[i][-1] for i in members)
                tone_name = "平" if tone == LEVEL else "仄"
                problems.append(f"rhyme set {index + 1} ({tone_name}, lines "
                                f"{', '.join(str(i + 1) for i in members)}): {ends} share no 词林正韵 {tone_name} group")
                rhyme_ok = False
            shared_by_set[index] = shared or set()
        for group in tune.same_bu:
            bus = [{cilin_bu(g) for g in shared_by_set[k]} for k in group]
            if all(bus) and not set.intersection(*bus):
                sets = " and ".join(str(k + 1) for k in group)
                problems.append(f"rhyme sets {sets} should rhyme in one 词林正韵 部")
                rhyme_ok = False
    matched = 0
    for line, spec in zip(lines, tune.lines):
        for ch, mark in zip(line, spec.tones):
            if mark in (LEVEL_MARK, OBLIQUE_MARK):
                matched += _tone_matches(ch, mark)
    strong = sum(ch != FREE_MARK for line in tune.lines for ch in line.tones)
    tone_agreement = matched / strong if strong else 1.0
    return CiCheck(structure_ok=structure_ok, rhyme_ok=rhyme_ok, tone_agreement=tone_agreement, problems=problems)


def tune_entry(tune: Tune) -> dict:
    """A tune as GET /v1/tunes lists it: its stanzas of lines, each with length, mark, rhyme set and tones."""
    return {
        "name": tune.name,
        "chars": tune.num_chars,
        "stanzas": [[{"length": line.length, "mark": line.mark, "rhyme": line.rhyme, "tones": line.tones}
                     for line in stanza] for stanza in tune.stanzas],
        "rhyme_sets": ["平" if t == LEVEL else "仄" for t in tune.rhyme_tones],
        "poems": tune.poems,
        "agreement": tune.agreement,
    }
