"""The four regular poem forms (绝句 and 律诗, five or seven characters a line) and their layout.

A poem is a list of lines; its text puts ， after odd lines and 。 after even ones:
"床前明月光，疑是地上霜。举头望明月，低头思故乡。"
"""

from __future__ import annotations

import re
from dataclasses import dataclass


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


def format_poem(lines: list[str]) -> str:
    """Join lines with ， after odd lines and 。 after even lines."""
    return "".join(line + (COMMA if i % 2 == 0 else PERIOD) for i, line in enumerate(lines))


def punctuation_at(form: Form, line_index: int) -> str:
    """The mark that closes line `line_index` (0-based)."""
    return COMMA if line_index % 2 == 0 else PERIOD
