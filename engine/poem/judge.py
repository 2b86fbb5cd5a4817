"""The one judge of a finished poem: its form, rhyme, tone agreement and repetitions, by the same 平水韵 /
中华新韵 tables the constraints use. The quality report, the engine's smoke test of a new version and the
retrain gate all call `check_poem`:

    check = check_poem("白日依山尽，黄河入海流。欲穷千里目，更上一层楼。", "wujue")
    check.form_valid, check.rhyme, check.tone_agreement, check.ok
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from engine.poem.constraints import SECOND_CHAR_SAME_AS_S
from engine.poem.forms import COMMA, PERIOD, Form, parse_form
from engine.poem.prosody import Prosody
from engine.poem.rhymes import LEVEL, OBLIQUE, char_info
from engine.poem.vocab import is_han


@dataclass
class PoemCheck:
    form_valid: bool  # exactly the form's lines of Han characters, ， and 。 alternating
    lines: list[str]  # the lines found (whatever the layout)
    rhyme: bool  # form valid, and the even lines end in level characters sharing one rhyme group
    tone_agreement: float  # share of tone positions (2nd/4th/6th characters, line ends; line 1 may rhyme) that fit, best s
    tone_positions: int  # positions checked (0 when the form is invalid)
    repeated_chars: list[str]  # characters used three times or more
    repeated_line: bool  # some line appears twice

    @property
    def ok(self) -> bool:
        """Valid form and rhyme, and neither repetition rule broken (tone is measured, not required)."""
        return self.form_valid and self.rhyme and not self.repeated_chars and not self.repeated_line


def _tones(ch: str, prosody: Prosody | None) -> int:
    info = prosody.char(ch) if prosody is not None else char_info(ch)
    return info.tones if info else 0


def check_poem(text: str, form: Form | str, prosody: Prosody | None = None) -> PoemCheck:
    """Judge a poem's text against `form` with the same 平水韵/中华新韵 data the constraints use."""
    form = parse_form(form) if isinstance(form, str) else form
    L = form.line_len
    lines = [piece for piece in text.replace(PERIOD, COMMA).split(COMMA) if piece]
    expected = "".join(line + (COMMA if i % 2 == 0 else PERIOD) for i, line in enumerate(lines))
    form_valid = (expected == text and len(lines) == form.num_lines
                  and all(len(line) == L and all(is_han(c) for c in line) for line in lines))
    counts = Counter(c for line in lines for c in line)
    repeated_chars = sorted(c for c, n in counts.items() if n >= 3)
    repeated_line = len(set(lines)) < len(lines)
    if not form_valid:
        return PoemCheck(False, lines, False, 0.0, 0, repeated_chars, repeated_line)

    info = lambda ch: prosody.char(ch) if prosody is not None else char_info(ch)  # noqa: E731
    ends = [info(line[-1]) for line in lines[1::2]]
    shared = None
    for end in ends:
        groups = end.groups if end and end.level else frozenset()
        shared = groups if shared is None else shared & groups
    rhyme = bool(shared)

    def _rhymes(ch: str) -> bool:  # line 1 may end in the rhyme instead of 仄 (首句入韵)
        first = info(ch)
        return bool(shared and first and first.level and first.groups & shared)

    best, total = 0, 0
    for s in (LEVEL, OBLIQUE):
        hits = total = 0
        for i, line in enumerate(lines):
            second = s if SECOND_CHAR_SAME_AS_S[i] else LEVEL + OBLIQUE - s
            wants = [(1, second), (3, LEVEL + OBLIQUE - second)] + ([(5, second)] if L == 7 else [])
            wants.append((L - 1, OBLIQUE if i % 2 == 0 else LEVEL))
            for col, tone in wants:
                total += 1
                hits += bool(_tones(line[col], prosody) & tone) or (i == 0 and col == L - 1 and _rhymes(line[col]))
        best = max(best, hits)
    return PoemCheck(True, lines, rhyme, best / total, total, repeated_chars, repeated_line)
