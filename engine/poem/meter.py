"""Read the meter of any 五/七言 绝句 or 律诗 a person pastes: form, 近体 or 古体, each character's tone, the
rhyme and its 平水韵 group, and the named faults with their places. Pure Python (no torch): the bot imports it.

    report = check_meter("国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。")
    report.form.chinese, report.style        # "五律", "jinti"
    report.lines[0].tones                    # "仄仄平平仄"
    report.rhyme_chars, report.rhyme_group   # ["深", "心", "金", "簪"], "下平声十二侵"
    report.faults                            # []
    print(format_report(report))             # the marked text the bot and `python -m engine check` show

Tones come from engine.poem.rhymes, the tables the generator uses (平水韵 first). A character with both readings (看 胜 更 忘 思 …) is 中 and fits either tone;
one 平水韵 lacks takes its 中华新韵 tone from pypinyin (no rhyme group); one with no reading at all is 中.

How a poem is read:
1. The template. Each line's 2nd character alternates by 粘对 (line 2 opposes line 1, line 3 follows line 2,
   …), odd lines end 仄 and even lines 平 (line 1 may end 平: 首句入韵). Of the four templates (line 1's 2nd
   character 平 or 仄, line 1 rhyming or not) the one the poem deviates from least is its template. The
   positions that must match are 二四六分明: the 2nd, 4th (and 6th in 七言) characters, and the last
   character of the lines that do not rhyme. The 1st, 3rd (and 5th) are free (一三五不论), except for 孤平
   and 三平尾 below.
2. 古体 or 近体. A poem that rhymes on 仄 (more than half its even lines end on a 仄-only character), or
   whose rhyme group holds fewer than half its even-line ends, or of which half the lines or more break
   the template after the accepted 拗救, is 古体 (e.g. 李白《静夜思》, 柳宗元《江雪》): it is named so and
   no faults are listed, since it never meant to follow these rules.
3. Faults of a 近体 poem, each with its line and character (1-based):
   - 失对: a line breaks the template at the 2nd/4th/6th or last character where its couplet partner
     decides it (line 1, every even line, and the 4th/6th/last of lines 3, 5, 7);
   - 失粘: the 2nd character of line 3, 5 or 7 differs from the 2nd of the line before;
   - 孤平: in a line of the 平平仄仄平 kind (七言 仄仄平平仄仄平), only one 平 besides the rhyme in its last
     five characters (仄平仄仄平; 七言 x仄仄平仄仄平); placed at the 1st (七言 3rd) character;
   - 三平尾: a rhyming line's last three characters all 平; placed at the third from last;
   - 出韵: a rhyme character outside the poem's group (the group most even lines share, earliest first),
     or a 仄 one; line 1 too when it ends 平;
   - 重韵: a rhyme character used again at a later rhyme.
   A 中 character fits either tone, so it never makes a fault.
4. 拗救 accepted (no fault), in the last five characters of a line (七言: its 3rd–7th):
   - 对句救: an odd line of the 仄仄平平仄 kind (七言 平平仄仄平平仄) with its 4th (七言 6th) character 仄
     — 仄仄平仄仄, also 仄仄仄仄仄 — when the next line's 3rd (七言 5th) character is 平: 平平平仄平
     (白居易 野火烧不尽，春风吹又生);
   - 本句自救 (特拗): a line of the 平平平仄仄 kind (七言 仄仄平平平仄仄) written 平平仄平仄 (七言 仄仄平平仄平仄):
     its 3rd and 4th (七言 5th and 6th) swapped, with the 1st (七言 3rd) not 仄;
   - 孤平拗救: 仄平平仄平 (七言 仄仄仄平平仄平) is not 孤平, since the 3rd (七言 5th) character is 平.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from engine.errors import RequestError
from engine.poem.forms import FORMS, LINE_BREAKS, Form, classify
from engine.poem.rhymes import LEVEL, OBLIQUE, char_info, pingshui_table
from engine.poem.vocab import is_han, to_simplified

EITHER = LEVEL | OBLIQUE  # 中: read both ways, or no data
TONE_NAMES = {LEVEL: "平", OBLIQUE: "仄", EITHER: "中"}
MARKS = {LEVEL: "○", OBLIQUE: "●", EITHER: "◐"}
MAX_POEM_CHARS = 400  # a 七律 with punctuation is 64; a longer text is not one poem

FORM_EN = {"wujue": "5-character quatrain", "qijue": "7-character quatrain",
           "wulv": "5-character regulated verse", "qilv": "7-character regulated verse"}


@dataclass(frozen=True)
class Reading:
    tones: int  # LEVEL | OBLIQUE bits; EITHER for 中 and for a character with no data
    level_groups: frozenset[str]  # 平声 rhyme groups, e.g. "下平声十二侵"
    oblique_groups: frozenset[str]  # 仄声 groups (上声/去声/入声), for naming the rhyme of a 古体 poem


@dataclass(frozen=True)
class Fault:
    kind: str  # 出韵 失对 失粘 孤平 三平尾 重韵
    line: int  # 1-based
    position: int | None  # 1-based character, None for the whole line
    zh: str
    en: str

    @property
    def message(self) -> str:
        return f"{self.zh} / {self.en}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "line": self.line, "position": self.position, "message": self.message}


@dataclass(frozen=True)
class MeterLine:
    text: str  # as the user wrote it
    tones: str  # one of 平 仄 中 per character


@dataclass
class MeterReport:
    form: Form
    style: str  # "jinti" (近体) | "guti" (古体)
    lines: list[MeterLine]
    rhyme_chars: list[str]
    rhyme_group: str | None
    faults: list[Fault] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The body of POST /v1/check."""
        return {"form": self.form.name, "style": self.style,
                "lines": [{"text": line.text, "tones": line.tones} for line in self.lines],
                "rhyme": {"chars": self.rhyme_chars, "group": self.rhyme_group},
                "faults": [f.to_dict() for f in self.faults]}


# -- the tables ------------------------------------------------------------------------------------------------
def reading(ch: str) -> Reading:
    """A character's tones and groups from engine.poem.rhymes (平水韵, else its 新韵 tone, whose groups are not
    平水韵 ones), else 中: a character with no data fits either tone."""
    info = char_info(ch)
    if info is None or not info.tones:
        return Reading(EITHER, frozenset(), frozenset())
    if info.source != "pingshui":
        return Reading(info.tones, frozenset(), frozenset())
    return Reading(info.tones, info.groups, info.oblique_groups)


# -- parsing -----------------------------------------------------------------------------------------------------
def parse_poem(text) -> tuple[Form, list[str], list[str]]:
    """(form, lines as written, lines simplified) or RequestError(field "poem") saying what a poem needs."""
    if not isinstance(text, str):
        raise RequestError("bad_type", "poem", f"poem must be str, got {type(text).__name__}")
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise RequestError("bad_character", "poem", "poem holds an unpaired surrogate, not a character")
    if len(text) > MAX_POEM_CHARS:
        raise RequestError("bad_poem", "poem", f"poem has {len(text)} characters; a poem to check has at most "
                                               f"{MAX_POEM_CHARS}")
    # Lines end at punctuation or whitespace (the bot's message may put each line on its own row).
    pieces = "".join(" " if ch in LINE_BREAKS or ch.isspace() else ch for ch in text).split()
    for ch in "".join(pieces):
        if not is_han(ch):
            raise RequestError("bad_character", "poem",
                               f"poem holds {ch!r}, which is not a Chinese character; give only the poem's "
                               f"lines (Han characters and punctuation), no title or author")
    if not pieces:
        raise RequestError("bad_poem", "poem", "poem is empty; give 4 or 8 lines of 5 or 7 characters")
    form = classify(pieces)
    if form is None:  # unpunctuated: a whole poem or whole couplets run together
        total = sum(map(len, pieces))
        form = next((f for f in FORMS.values() if f.num_chars == total
                     and all(len(p) % f.line_len == 0 for p in pieces)), None)
        if form is not None:
            joined = "".join(pieces)
            pieces = [joined[i:i + form.line_len] for i in range(0, total, form.line_len)]
    if form is None:
        lengths = "、".join(str(len(p)) for p in pieces[:10]) + ("…" if len(pieces) > 10 else "")
        raise RequestError("bad_poem", "poem",
                           f"poem has {len(pieces)} line{'s' * (len(pieces) != 1)} ({lengths} characters); give a 绝句 or "
                           f"律诗: 4 or 8 lines of 5 or 7 characters")
    return form, pieces, [_simplified(line) for line in pieces]


def _simplified(line: str) -> str:
    """t2s by phrase; per character when the phrase tables change the length (a tone per character)."""
    simple = to_simplified(line)
    if len(simple) == len(line):
        return simple
    return "".join(s if len(s := to_simplified(ch)) == 1 else ch for ch in line)


# -- the reading -------------------------------------------------------------------------------------------------
def _fits(tones: int, want: int) -> bool:
    return bool(tones & want)


def _opposite(tone: int) -> int:
    return LEVEL + OBLIQUE - tone


def _pattern(second: int, end: int, length: int) -> list[int]:
    """The regular line whose 2nd character is `second` and last is `end` (仄仄平平仄, 平平仄仄平, …)."""
    core_second = second if length == 5 else _opposite(second)
    P, Z = LEVEL, OBLIQUE
    core = {(Z, Z): [Z, Z, P, P, Z], (Z, P): [Z, Z, Z, P, P],
            (P, Z): [P, P, P, Z, Z], (P, P): [P, P, Z, Z, P]}[(core_second, end)]
    return core if length == 5 else [second, second, *core]


@dataclass
class _Template:
    first_rhymes: bool
    patterns: list[list[int]]


def _templates(form: Form) -> list[_Template]:
    out = []
    for first in (LEVEL, OBLIQUE):
        for first_rhymes in (False, True):
            seconds, patterns = [first], []
            for i in range(1, form.num_lines):
                # Even lines (0-based odd) oppose the line before (对); odd lines follow it (粘).
                seconds.append(_opposite(seconds[-1]) if i % 2 == 1 else seconds[-1])
            for i, second in enumerate(seconds):
                end = LEVEL if i % 2 == 1 or (i == 0 and first_rhymes) else OBLIQUE
                patterns.append(_pattern(second, end, form.line_len))
            out.append(_Template(first_rhymes, patterns))
    return out


def _deviations(tones: list[list[int]], template: _Template, length: int) -> list[tuple[int, int]]:
    """(line, position) pairs, 0-based, where the poem breaks the template after the accepted 拗救.
    An even line's last character is the rhyme's business (出韵), not the template's."""
    checked = [1, 3] + ([5] if length == 7 else [])
    found = []
    for i, (line, want) in enumerate(zip(tones, template.patterns)):
        places = [p for p in checked if not _fits(line[p], want[p])]
        if i % 2 == 0 and not _fits(line[-1], want[-1]):
            places.append(length - 1)
        c = length - 5  # where the five-character core starts
        if places == [c + 3] and want[c:] == [OBLIQUE, OBLIQUE, LEVEL, LEVEL, OBLIQUE] and i % 2 == 0 \
                and i + 1 < len(tones) and _fits(tones[i + 1][c + 2], LEVEL):
            places = []  # 对句救: 仄仄平仄仄 answered by 平平平仄平
        if places == [c + 3] and want[c:] == [LEVEL, LEVEL, LEVEL, OBLIQUE, OBLIQUE] \
                and _fits(line[c + 2], OBLIQUE) and _fits(line[c], LEVEL):
            places = []  # 本句自救: 平平仄平仄
        found += [(i, p) for p in places]
    return found


def _rhyme_group(ends: list[Reading], first: Reading | None, oblique: bool) -> str | None:
    """The group most even-line ends share (then line 1's, then the earliest): the poem's rhyme."""
    pick = (lambda r: r.oblique_groups) if oblique else (lambda r: r.level_groups)
    candidates = {g for r in ends for g in pick(r)} | (set(pick(first)) if first else set())

    def score(g):
        hits = [k for k, r in enumerate(ends) if g in pick(r)]
        return len(hits), bool(first and g in pick(first)), -min(hits, default=len(ends)), g

    return max(candidates, key=score) if candidates else None


def check_meter(text) -> MeterReport:
    """The meter of a pasted 绝句 or 律诗; RequestError (field "poem") when it is not one."""
    form, written, simple = parse_poem(text)
    L, n = form.line_len, form.num_lines
    table = pingshui_table()
    # The simplified character first; the one as written when only it is in the book.
    readings = [[reading(w if s not in table and w in table else s) for s, w in zip(s_line, w_line)]
                for s_line, w_line in zip(simple, written)]
    tones = [[r.tones for r in line] for line in readings]
    lines = [MeterLine(w, "".join(TONE_NAMES[t] for t in line)) for w, line in zip(written, tones)]

    ends = [readings[i][-1] for i in range(1, n, 2)]
    first_end = readings[0][-1]
    oblique_rhyme = 2 * sum(not _fits(r.tones, LEVEL) for r in ends) > len(ends)
    group = _rhyme_group(ends, first_end if _fits(first_end.tones, LEVEL) or oblique_rhyme else None, oblique_rhyme)
    in_group = lambda r: group is not None and group in (r.oblique_groups if oblique_rhyme else r.level_groups)  # noqa: E731

    # The template the poem breaks least; on a tie, line 1 rhymes exactly when its end is in the group.
    def cost(t: _Template):
        return len(_deviations(tones, t, L)), t.first_rhymes != in_group(first_end)

    template = min(_templates(form), key=cost)
    deviations = _deviations(tones, template, L)
    rhyme_lines = ([0] if template.first_rhymes or (oblique_rhyme and in_group(first_end)) else []) + list(range(1, n, 2))
    rhyme_chars = [simple[i][-1] for i in rhyme_lines]

    shared = sum(in_group(r) for r in ends)
    broken_lines = len({i for i, _ in deviations})
    if oblique_rhyme or 2 * shared < len(ends) or 2 * broken_lines >= n:
        return MeterReport(form, "guti", lines, rhyme_chars, group, [])

    faults: list[Fault] = []
    for i, p in deviations:
        want = TONE_NAMES[template.patterns[i][p]]
        ch = written[i][p]
        if p == 1 and i % 2 == 0 and i > 0:
            faults.append(Fault("失粘", i + 1, p + 1, f"第{i + 1}句第2字「{ch}」应为{want}声，与上句第2字相粘",
                                f"line {i + 1}, char 2 ({ch}) should be {_en(want)} to match line {i}'s 2nd"))
        else:
            partner = i + 2 if i % 2 == 0 else i
            faults.append(Fault("失对", i + 1, p + 1, f"第{i + 1}句第{p + 1}字「{ch}」应为{want}声，与第{partner}句相对",
                                f"line {i + 1}, char {p + 1} ({ch}) should be {_en(want)}, opposite line {partner}"))
    broken = {i for i, _ in deviations}
    c = L - 5
    for i in range(n):
        want = template.patterns[i]
        if i in broken or want[-1] != LEVEL:
            continue
        core = tones[i][c:]
        if want[c:] == [LEVEL, LEVEL, OBLIQUE, OBLIQUE, LEVEL] and sum(_fits(t, LEVEL) for t in core[:4]) <= 1:
            faults.append(Fault("孤平", i + 1, c + 1, f"第{i + 1}句犯孤平：除韵脚外只有一个平声字",
                                f"line {i + 1} is 孤平 (lone level tone): one level tone besides the rhyme"))
        if all(t == LEVEL for t in core[2:]):
            faults.append(Fault("三平尾", i + 1, L - 2, f"第{i + 1}句末三字皆平（三平尾）",
                                f"line {i + 1} ends in three level tones (三平尾)"))
    seen: dict[str, int] = {}
    for i in rhyme_lines:
        ch, r = simple[i][-1], readings[i][-1]
        if ch in seen:
            faults.append(Fault("重韵", i + 1, L, f"韵脚「{ch}」与第{seen[ch] + 1}句重复",
                                f"rhyme {ch} repeats line {seen[ch] + 1}'s"))
        elif not in_group(r):
            where = "、".join(sorted(r.level_groups)) or "仄声"
            faults.append(Fault("出韵", i + 1, L, f"韵脚「{written[i][-1]}」属{where}，不在{group}",
                                f"rhyme {written[i][-1]} is in {where}, not {group}"))
        seen.setdefault(ch, i)
    faults.sort(key=lambda f: (f.line, f.position or 0))
    return MeterReport(form, "jinti", lines, rhyme_chars, group, faults)


def _en(tone_name: str) -> str:
    return {"平": "level (平)", "仄": "oblique (仄)"}.get(tone_name, tone_name)


def check_body(data) -> MeterReport:
    """POST /v1/check's body {"poem": "…"}: validated (RequestError for the 400), then read."""
    if not isinstance(data, dict):
        raise RequestError("bad_request", None, "the body must be a JSON object")
    unknown = sorted(k for k in data if k != "poem")
    if unknown:
        raise RequestError("unknown_field", unknown[0], f"unknown field {unknown[0]!r}; allowed: poem")
    if data.get("poem") is None:
        raise RequestError("missing_field", "poem", "poem is required: the text of a 绝句 or 律诗")
    return check_meter(data["poem"])


# -- the reply text ----------------------------------------------------------------------------------------------
def format_report(report: MeterReport) -> str:
    """Each verse with a mark under every character (○ 平 ● 仄 ◐ 中), then the verdict, Chinese then English."""
    rows = []
    for line in report.lines:
        rows += [line.text, "".join(MARKS[{"平": LEVEL, "仄": OBLIQUE, "中": EITHER}[t]] for t in line.tones)]
    form = report.form
    rhyme = "、".join(report.rhyme_chars)
    group = report.rhyme_group or "无共同韵部"
    group_en = report.rhyme_group or "no shared group"
    if report.style == "guti":
        zh = [f"{form.chinese} · 古体 · 韵 {group}（{rhyme}）", "不守近体粘对平仄，按古体读，不逐字论病。"]
        en = [f"{FORM_EN[form.name]} · old style (古体) · rhyme {group_en}",
              "It does not follow regulated-verse tone rules, so it is read as old style; no faults listed."]
    else:
        zh = [f"{form.chinese} · 近体 · 韵 {group}（{rhyme}）"]
        en = [f"{FORM_EN[form.name]} · regulated (近体) · rhyme {group_en}"]
        zh += [f"{f.kind}：{f.zh}" for f in report.faults] or ["合律。"]
        en += [f"{f.kind}: {f.en}" for f in report.faults] or ["Follows the rules."]
    return "\n".join(rows + ["", *zh, "", *en, "", "○平 ●仄 ◐可平可仄 / ○ level ● oblique ◐ either"])


# -- python -m engine check ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("poem", nargs="+", help="the poem's text: 4 or 8 lines of 5 or 7 characters (spaces allowed)")


def main(args) -> int:
    try:
        report = check_meter(" ".join(args.poem))
    except RequestError as e:
        print(f"python -m engine check: {e.message}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0
