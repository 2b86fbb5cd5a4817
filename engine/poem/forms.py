"""The four regular poem forms (绝句 and 律诗, five or seven characters a line) and their layout.

A poem is a list of lines; its text puts ， after odd lines and 。 after even ones:
"床前明月光，疑是地上霜。举头望明月，低头思故乡。"
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Form:
    name: str  # the contract name: wujue | qijue | wulv | qilv
    chinese: str  # 五绝 …
    num_lines: int
    line_len: int  # Han characters a line
    aliases: tuple[str, ...]

    @property
    def num_chars(self) -> int:
        """Han characters in the whole poem."""
        return self.num_lines * self.line_len

    @property
    def text_len(self) -> int:
        """Characters in the poem's text, punctuation included."""
        return self.num_lines * (self.line_len + 1)

    @property
    def layout(self) -> Layout:
        return _form_layout(self)


@dataclass(frozen=True)
class Layout:
    """Where each line and mark of a poem's text lies: the positions decoding works in, for a regular form
    and for a 词 tune alike. Position p of the text is line `line_of[p]`, column `col_of[p]`; the column
    equal to the line's length is its mark.

        Layout((5, 5), ("，", "。")).col_of   # (0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5)
    """

    line_lengths: tuple[int, ...]
    marks: tuple[str, ...]  # the mark closing each line: ， or 。
    starts: tuple[int, ...] = field(init=False)  # text position of each line's first character
    line_of: tuple[int, ...] = field(init=False)
    col_of: tuple[int, ...] = field(init=False)
    han_positions: tuple[int, ...] = field(init=False)  # the characters' positions, in order (a prompt fills them)

    def __post_init__(self):
        if len(self.line_lengths) != len(self.marks) or not self.line_lengths or min(self.line_lengths) < 1:
            raise ValueError("a layout needs one mark per line and lines of at least one character")
        starts, line_of, col_of, pos = [], [], [], 0
        for i, n in enumerate(self.line_lengths):
            starts.append(pos)
            line_of += [i] * (n + 1)
            col_of += range(n + 1)
            pos += n + 1
        object.__setattr__(self, "starts", tuple(starts))
        object.__setattr__(self, "line_of", tuple(line_of))
        object.__setattr__(self, "col_of", tuple(col_of))
        object.__setattr__(self, "han_positions", tuple(p for p, c in enumerate(col_of)
                                                        if c != self.line_lengths[line_of[p]]))

    @property
    def num_lines(self) -> int:
        return len(self.line_lengths)

    @property
    def text_len(self) -> int:
        return len(self.col_of)

    @property
    def num_chars(self) -> int:
        return sum(self.line_lengths)

    def is_mark(self, pos: int) -> bool:
        return self.col_of[pos] == self.line_lengths[self.line_of[pos]]

    def where(self, pos: int) -> str:
        return f"line {self.line_of[pos] + 1}, character {self.col_of[pos] + 1}"


@functools.cache
def _form_layout(form: Form) -> Layout:
    return Layout((form.line_len,) * form.num_lines,
                  tuple(COMMA if i % 2 == 0 else PERIOD for i in range(form.num_lines)))


FORMS: dict[str, Form] = {
    f.name: f
    for f in (
        Form("wujue", "五绝", 4, 5, ("五绝", "五言绝句", "五言絕句", "五絕")),
        Form("qijue", "七绝", 4, 7, ("七绝", "七言绝句", "七言絕句", "七絕")),
        Form("wulv", "五律", 8, 5, ("五律", "五言律诗", "五言律詩")),
        Form("qilv", "七律", 8, 7, ("七律", "七言律诗", "七言律詩")),
    )
}
FORM_NAMES = tuple(FORMS)
DEFAULT_FORM = "qijue"

COMMA, PERIOD = "，", "。"
# Upstream poems end their lines with any of these; we rewrite them to the regular ，。 layout.
LINE_BREAKS = "，。？！；、,.?!;:："
_LINE_SPLIT = re.compile(f"[{re.escape(LINE_BREAKS)}]")

_ALIASES = {alias.lower(): f for f in FORMS.values() for alias in (f.name, *f.aliases)}


def parse_form(name: str) -> Form:
    """The form for a contract name, a Chinese name or an alias (`qijue`, `七绝`, `七言绝句`)."""
    form = _ALIASES.get(name.strip().lower())
    if form is None:
        allowed = ", ".join(f"{f.name} ({f.chinese})" for f in FORMS.values())
        raise ValueError(f"unknown form {name!r}; allowed: {allowed}")
    return form


def split_lines(text: str) -> list[str]:
    """Split a poem's text at its line punctuation, dropping empty pieces."""
    return [piece.strip() for piece in _LINE_SPLIT.split(text) if piece.strip()]


def classify(lines: list[str]) -> Form | None:
    """The regular form these lines make, or None (wrong count, uneven or odd line length)."""
    if not lines or len({len(line) for line in lines}) != 1:
        return None
    for form in FORMS.values():
        if form.num_lines == len(lines) and form.line_len == len(lines[0]):
            return form
    return None


def rhyme_positions(form: Form, count: int) -> list[int]:
    """Where `count` rhyme characters go in the text, in order: the ends of lines 2, 4, …, with line 1's end
    first when `count` is one more than those (首句入韵)."""
    lines = ([0] if count == form.num_lines // 2 + 1 else []) + list(range(1, form.num_lines, 2))
    return [form.layout.starts[i] + form.line_len - 1 for i in lines]


def format_poem(lines: list[str]) -> str:
    """Join lines with ， after odd lines and 。 after even lines."""
    return "".join(line + (COMMA if i % 2 == 0 else PERIOD) for i, line in enumerate(lines))


def punctuation_at(form: Form, line_index: int) -> str:
    """The mark that closes line `line_index` (0-based)."""
    return COMMA if line_index % 2 == 0 else PERIOD
