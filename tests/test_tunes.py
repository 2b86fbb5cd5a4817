"""词 tunes: the 词林正韵 groups, the derivation of tune patterns (on a synthetic corpus the test writes), the
shipped tunes.json, and parse_tune / format_ci / check_ci."""

from __future__ import annotations

import json
import random

import pytest

from engine.poem import rhymes
from engine.poem.rhymes import LEVEL, OBLIQUE, cilin_groups, cilin_tone, pingshui_table
from engine.poem.tunes import (
    TUNES,
    TUNES_JSON,
    check_ci,
    format_ci,
    load_tunes,
    parse_tune,
    split_ci,
)
from engine.poem.vocab import to_simplified
from trainer import tunes as derivation
from trainer.__main__ import main as trainer_main
from trainer.corpus import normalise, split_of

# -- 词林正韵 -------------------------------------------------------------------------------------------------


def test_cilin_merges_pingshui_groups_into_bu():
    assert cilin_groups("东") == cilin_groups("冬") == {"第一部平"}  # 一东 and 二冬 are one 部
    assert cilin_groups("月") == {"第十八部入"}
    assert cilin_groups("雪") == {"第十八部入"}
    assert cilin_groups("花") & cilin_groups("家") == {"第十部平"}
    assert "第一部仄" in cilin_groups("动")  # 上声一董
    assert cilin_groups("看") == {"第七部平", "第七部仄"}  # two readings, two groups


def test_cilin_splits_the_half_groups_by_final():
    # 十灰: 灰 rhyme → 第三部, 咍 rhyme → 第五部; 十三元: -en → 第六部, -yuan → 第七部
    assert "第三部平" in cilin_groups("杯") and "第五部平" not in cilin_groups("杯")
    assert "第五部平" in cilin_groups("来") and "第三部平" not in cilin_groups("来")
    assert cilin_groups("门") == {"第六部平"}
    assert cilin_groups("元") == {"第七部平"}


def test_cilin_of_unknown_characters_and_tones():
    assert cilin_groups("A") == frozenset()
    assert cilin_groups("") == frozenset()
    assert cilin_tone("第一部平") == LEVEL
    assert cilin_tone("第三部仄") == OBLIQUE
    assert cilin_tone("第十五部入") == OBLIQUE
    with pytest.raises(ValueError):
        cilin_tone("上平声一东")


def test_every_pingshui_character_has_a_cilin_group():
    table = pingshui_table()
    missing = [ch for ch in table if not cilin_groups(ch)]
    assert missing == []
    names = {g for ch in table for g in cilin_groups(ch)}
    assert len({g[:-1] for g in names}) == 19  # nineteen 部
    assert {g[:-1] for g in names if g.endswith("入")} == {rhymes.cilin_name(b, "入")[:-1] for b in range(15, 20)}


# -- the derivation, on a synthetic corpus ------------------------------------------------------------------

def _pools():
    """Single-reading characters by tone, and 平/仄 rhyme pools by 词林 group (only chars with one group)."""
    level, oblique, by_group = [], [], {}
    for ch, info in sorted(pingshui_table().items()):
        groups = cilin_groups(ch)
        if info.level == info.oblique or len(groups) != 1 or to_simplified(ch) != ch:
            continue  # two readings, or a traditional form that simplifies to another character
        (level if info.level else oblique).append(ch)
        by_group.setdefault(next(iter(groups)), []).append(ch)
    return level, oblique, {g: chars for g, chars in by_group.items() if len(chars) >= 30}


LEVEL_CHARS, OBLIQUE_CHARS, RHYME_POOLS = _pools()
LEVEL_RHYMES = sorted(g for g in RHYME_POOLS if g.endswith("平"))
OBLIQUE_RHYMES = sorted(g for g in RHYME_POOLS if not g.endswith("平"))

# A made-up tune: 5,5,7,5 | 5,5,7,5; lines 2,4,6,8 rhyme 平; the first character of every line is free.
JIA = {"lines": ["·平仄仄平", "·仄仄平平", "·仄平平仄仄平", "·平仄仄平", "·平仄仄平", "·仄仄平平", "·仄平平仄仄平",
                 "·平仄仄平"],
       "rhyme": [None, 0, None, 0, None, 0, None, 0], "marks": "，。，。，。，。"}
# Another: 7,7,5,5 | 5,5,5,5 changing rhyme 仄 平 仄 平, two lines each (菩萨蛮's shape).
YI = {"lines": ["平平仄仄平平仄", "平平仄仄平平仄", "仄仄仄平平", "平平仄仄平", "平平平仄仄", "仄仄平平仄", "仄仄仄平平",
                "平平仄仄平"],
      "rhyme": [0, 0, 1, 1, 2, 2, 3, 3], "marks": "，。，。，。，。"}
YI_TONES = [OBLIQUE, LEVEL, OBLIQUE, LEVEL]


def _poem(rng, shape, set_tones, noise=0.0):
    groups = {}
    for index, tone in enumerate(set_tones):
        choices = [g for g in (LEVEL_RHYMES if tone == LEVEL else OBLIQUE_RHYMES) if g not in groups.values()]
        groups[index] = rng.choice(choices)
    lines = []
    for pattern, rhyme in zip(shape["lines"], shape["rhyme"]):
        chars = []
        for pos, mark in enumerate(pattern):
            if rhyme is not None and pos == len(pattern) - 1:
                chars.append(rng.choice(RHYME_POOLS[groups[rhyme]]))
            elif mark == "·" or rng.random() < noise:
                chars.append(rng.choice(LEVEL_CHARS + OBLIQUE_CHARS))
            else:
                chars.append(rng.choice(LEVEL_CHARS if mark == "平" else OBLIQUE_CHARS))
        lines.append("".join(chars))
    return lines


def _record(name, lines, marks, split):
    """A record whose normalised text falls in `split`, or None."""
    paragraphs = ["".join(line + mark for line, mark in zip(lines, marks))]
    poem, _ = normalise({"rhythmic": name, "paragraphs": paragraphs})
    if poem is None or split_of(poem.text) != split:
        return None
    return {"rhythmic": name, "author": "测试", "paragraphs": paragraphs}


def _records(rng, name, shape, set_tones, n_train, n_val=0, variant=None, n_variant=0, marks=None):
    out = []
    for split, count, use in (("train", n_train, shape), ("val", n_val, variant or shape),
                              ("train", n_variant, variant)):
        made = 0
        while made < count:
            lines = _poem(rng, use, set_tones if use is shape else [LEVEL] * (max(
                (r for r in use["rhyme"] if r is not None), default=-1) + 1))
            record = _record(name, lines, marks(rng) if marks else use["marks"], split)
            if record:
                out.append(record)
                made += 1
    return out


# A variant shape of JIA (its last line 7 characters), used by a few train poems and by every held-out one.
JIA_VARIANT = dict(JIA, lines=JIA["lines"][:-1] + ["·仄平平仄仄平"])


def _jia_marks(rng):
    # ，。 alternating, but most poems write ； and ？ at two line ends: they count as ， and 。
    marks = list(JIA["marks"])
    if rng.random() < 0.7:
        marks[0] = "；"
    if rng.random() < 0.7:
        marks[3] = "？"
    return "".join(marks)


@pytest.fixture(scope="module")
def fixture_corpus(tmp_path_factory):
    rng = random.Random(18)
    root = tmp_path_factory.mktemp("corpus")
    (root / "宋词").mkdir()
    jia = _records(rng, "测试甲", JIA, [LEVEL], n_train=36, n_val=6, variant=JIA_VARIANT, n_variant=4,
                   marks=_jia_marks)
    jia += _records(rng, "甲别名・测试甲", JIA, [LEVEL], n_train=6)
    yi = _records(rng, "測試乙", YI, YI_TONES, n_train=30)  # traditional: the name is simplified
    few = _records(rng, "测试丙", JIA, [LEVEL], n_train=5)
    records = jia + yi + few
    rng.shuffle(records)
    (root / "宋词" / "ci.song.0.json").write_text(json.dumps(records[:50], ensure_ascii=False), encoding="utf-8")
    (root / "宋词" / "ci.song.1000.json").write_text(json.dumps(records[50:], ensure_ascii=False), encoding="utf-8")
    out = root / "tunes.json"
    assert trainer_main(["tunes", "derive", "--corpus", str(root), "--out", str(out), "--top", "5",
                         "--min-poems", "20"]) == 0
    return root, out, records


def test_derivation_finds_lengths_marks_and_the_main_variant(fixture_corpus):
    _, out, _ = fixture_corpus
    tunes, aliases = load_tunes(out)
    assert sorted(tunes) == ["测试乙", "测试甲"]  # 测试丙 has too few poems
    jia = tunes["测试甲"]
    assert jia.line_lengths == (5, 5, 7, 5, 5, 5, 7, 5)
    # 36 + 6 (written under the alias) main-variant poems and 4 variant ones; the held-out poems (all of the
    # variant shape) are not read, or the agreement would be 42/52.
    assert jia.poems == 46
    assert jia.agreement == pytest.approx(42 / 46, abs=1e-3)
    assert [line.mark for line in jia.lines] == list("，。，。，。，。")
    assert aliases["甲别名"] == "测试甲"


def test_derivation_finds_the_stanza_break_and_rhyme_sets(fixture_corpus):
    _, out, _ = fixture_corpus
    tunes, _ = load_tunes(out)
    jia, yi = tunes["测试甲"], tunes["测试乙"]
    assert jia.stanza_break == 4
    assert [line.rhyme for line in jia.lines] == JIA["rhyme"]
    assert jia.rhyme_tones == (LEVEL,)
    assert yi.line_lengths == (7, 7, 5, 5, 5, 5, 5, 5)
    assert yi.stanza_break == 4
    assert [line.rhyme for line in yi.lines] == YI["rhyme"]
    assert yi.rhyme_tones == tuple(YI_TONES)


def test_derivation_finds_the_strong_tones(fixture_corpus):
    _, out, _ = fixture_corpus
    tunes, _ = load_tunes(out)
    assert [line.tones for line in tunes["测试甲"].lines] == JIA["lines"]
    assert [line.tones for line in tunes["测试乙"].lines] == YI["lines"]
    assert tunes["测试甲"].tone_agreement == 1.0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["tunes"]["测试甲"]["lines"][0]["tone_share"][1] == 1.0


def test_derived_json_holds_no_poem_text_and_is_deterministic(fixture_corpus, tmp_path):
    root, out, records = fixture_corpus
    text = out.read_text(encoding="utf-8")
    for record in records:
        for line in split_ci(record["paragraphs"][0]):
            assert line not in text
    again = tmp_path / "again.json"
    assert trainer_main(["tunes", "derive", "--corpus", str(root), "--out", str(again), "--top", "5",
                         "--min-poems", "20"]) == 0
    assert again.read_text(encoding="utf-8") == text


def test_derive_reads_only_the_training_split(fixture_corpus):
    root, _, records = fixture_corpus
    read = derivation.read_ci(derivation.ci_files(root))
    assert len(read) == len(records) - sum(1 for r in records if split_of(normalise(r)[0].text) == "val")
    assert all(split_of(text) == "train" for _, text in read)
    assert any(split_of(normalise(r)[0].text) == "val" for r in records)


def test_derive_cli_errors(tmp_path, capsys):
    assert trainer_main(["tunes", "derive", "--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert trainer_main(["tunes", "derive", "--corpus", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "ci.song" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_segments_normalise_the_marks():
    assert derivation.segments("春风；明月？何处、归来！天涯：远客") == [
        ("春风", "，"), ("明月", "。"), ("何处", "，"), ("归来", "。"), ("天涯", "，"), ("远客", "。")]


def test_a_line_that_rhymes_in_half_the_poems_is_no_rhyme():
    rng = random.Random(3)
    east, oblique = RHYME_POOLS["第一部平"], [c for c in OBLIQUE_CHARS if "第一部仄" not in cilin_groups(c)]
    poems = []
    for k in range(40):
        middle = rng.choice(east) if k % 2 else rng.choice(oblique)
        poems.append([(rng.choice(east), "。"), (middle, "，"), (rng.choice(east), "。")])
    sets, share = derivation._rhyme_sets(poems, 3)
    assert sets == [[0, 2]] and share[0] == share[2] == 1.0


@pytest.mark.parametrize("lengths, marks, expected", [
    ([7, 7, 7, 7, 7, 7], "，。。，。。", 3),  # 浣溪沙
    ([7, 7, 7, 7, 3, 3, 7, 7, 7], "，。，。，。，。。", 4),  # 鹧鸪天
    ([7, 7, 5, 5, 5, 5, 5, 5], "。。，。，。，。", 4),  # 菩萨蛮
    ([6, 6, 7, 6, 6, 6, 7, 6], "，。，。，。，。", 4),  # 西江月
    ([7, 5, 6, 5, 3, 3, 3, 4, 4, 4], "，。，。，，。，，。", 4),  # 诉衷情: no repeat, the even break
    ([6, 6, 5, 6, 2, 2, 6], "，。，。。。。", 7),  # 如梦令: single-stanza
])
def test_stanza_break_rule(lengths, marks, expected):
    assert derivation.stanza_break(lengths, list(marks), [m == "。" for m in marks]) == expected


def test_canonical_names_group_aliases():
    mapping, aliases = derivation.canonical_names(["蝶恋花"] * 5 + ["凤栖梧・蝶恋花"] * 2 + ["凤栖梧"] + ["失调名"] * 9)
    assert mapping["凤栖梧・蝶恋花"] == "蝶恋花" and mapping["凤栖梧"] == "蝶恋花"
    assert aliases == {"凤栖梧": "蝶恋花"}
    assert "失调名" not in mapping


# -- the shipped tunes ---------------------------------------------------------------------------------------

def test_shipped_tunes_are_many_and_well_formed():
    assert len(TUNES) >= 30
    for name, tune in TUNES.items():
        assert tune.name == name
        assert tune.poems >= 20 and 0 < tune.agreement <= 1 and 0 < tune.tone_agreement <= 1
        assert 1 <= tune.stanza_break <= len(tune.lines)
        assert tune.lines[-1].mark == "。" and tune.lines[tune.stanza_break - 1].mark == "。"
        assert all(line.mark in "，。" and set(line.tones) <= set("平仄·") for line in tune.lines)
        used = sorted({line.rhyme for line in tune.lines if line.rhyme is not None})
        assert used == list(range(len(tune.rhyme_tones))), name
        assert tune.lines[-1].rhyme is not None, name  # every tune ends on a rhyme
        assert tune.text_len == tune.num_chars + len(tune.lines)


def test_shipped_well_known_tunes():
    h = TUNES["浣溪沙"]
    assert h.line_lengths == (7,) * 6 and h.stanza_break == 3
    assert h.rhyme_tones == (LEVEL,) and [line.rhyme for line in h.lines] == [0, 0, 0, None, 0, 0]
    p = TUNES["菩萨蛮"]
    assert p.line_lengths == (7, 7, 5, 5, 5, 5, 5, 5) and p.stanza_break == 4
    assert p.rhyme_tones == (OBLIQUE, LEVEL, OBLIQUE, LEVEL)
    assert [line.rhyme for line in p.lines] == [0, 0, 1, 1, 2, 2, 3, 3]
    z = TUNES["鹧鸪天"]
    assert z.line_lengths == (7, 7, 7, 7, 3, 3, 7, 7, 7) and z.stanza_break == 4
    x = TUNES["西江月"]
    assert x.stanza_break == 4 and x.rhyme_tones == (LEVEL, OBLIQUE)  # 平 and 仄 of one 部: two sets
    assert [line.rhyme for line in x.lines] == [None, 0, 0, 1, None, 0, 0, 1]
    assert x.same_bu == ((0, 1),)  # its 平 and 仄 rhymes: one 部
    assert TUNES["如梦令"].stanza_break == len(TUNES["如梦令"].lines)
    assert TUNES["水调歌头"].stanza_break == 9 and TUNES["满江红"].stanza_break == 11


def test_shipped_tunes_json_is_what_the_derivation_writes(tmp_path):
    corpus = TUNES_JSON.parents[2].parent / "shared" / "corpus" / "chinese-poetry"
    if not list(corpus.glob("宋词/ci.song.*.json")):
        pytest.skip(f"no Song ci under {corpus}")
    out = tmp_path / "tunes.json"
    assert trainer_main(["tunes", "derive", "--corpus", str(corpus), "--out", str(out), "--top", "40"]) == 0
    assert out.read_text(encoding="utf-8") == TUNES_JSON.read_text(encoding="utf-8")
    assert TUNES["水龙吟"].lines[12].rhyme is None  # its 换头 rhymes in about half the poems only


def test_shipped_json_holds_no_long_han_text():
    data = json.loads(TUNES_JSON.read_text(encoding="utf-8"))
    names = set(data["tunes"]) | set(data["aliases"])
    assert all(len(name) <= 8 for name in names)
    for tune in data["tunes"].values():
        assert set(tune) - {"same_bu"} == {"poems", "main", "agreement", "variants", "stanza_break", "rhyme_tones",
                                           "tone_agreement", "lines"}


# -- parse_tune, format_ci, check_ci -------------------------------------------------------------------------

def test_parse_tune_names_and_aliases():
    assert parse_tune("浣溪沙").name == "浣溪沙"
    assert parse_tune(" 浣溪紗 ").name == "浣溪沙"  # traditional
    assert parse_tune("鷓鴣天").name == "鹧鸪天"
    assert parse_tune("凤栖梧").name == "蝶恋花"  # alias
    assert parse_tune("念奴娇・赤壁怀古").name == "念奴娇"


@pytest.mark.parametrize("name", ["", "不存在的调", "浣溪", "   "])
def test_parse_tune_errors(name):
    with pytest.raises(ValueError, match="known tunes include 浣溪沙"):
        parse_tune(name)


def _lines_for(tune, rhyme_groups=None):
    """Lines that follow `tune` exactly: strong tones kept, each rhyme set in one 词林 group."""
    rng = random.Random(7)
    rhyme_groups = rhyme_groups or {}
    for index, tone in enumerate(tune.rhyme_tones):
        linked = any(index in group for group in tune.same_bu)  # 西江月: 平 and 仄 of one 部
        rhyme_groups.setdefault(index, "第一部平" if tone == LEVEL else "第一部仄" if linked else "第十八部入")
    lines = []
    for line in tune.lines:
        chars = []
        for pos, mark in enumerate(line.tones):
            if line.rhyme is not None and pos == line.length - 1:
                chars.append(rng.choice(RHYME_POOLS[rhyme_groups[line.rhyme]]))
            else:
                chars.append(rng.choice(LEVEL_CHARS if mark == "平" else OBLIQUE_CHARS))
        lines.append("".join(chars))
    return lines


@pytest.mark.parametrize("name", ["浣溪沙", "菩萨蛮", "鹧鸪天", "西江月", "如梦令"])
def test_format_and_check_round_trip(name):
    tune = TUNES[name]
    lines = _lines_for(tune)
    text = format_ci(tune, lines)
    assert split_ci(text) == lines
    assert len(text) == tune.text_len + (tune.stanza_break < len(tune.lines))
    stanzas = text.split("\n")
    assert len(stanzas) == (2 if tune.stanza_break < len(tune.lines) else 1)
    assert stanzas[0].count("，") + stanzas[0].count("。") == tune.stanza_break
    result = check_ci(tune, text)
    assert result.structure_ok and result.rhyme_ok and result.ok, result.problems
    assert result.tone_agreement == 1.0 and result.problems == []


def test_check_ci_wants_the_linked_rhyme_sets_in_one_bu():
    tune = TUNES["西江月"]
    apart = check_ci(tune, format_ci(tune, _lines_for(tune, {0: "第一部平", 1: "第十八部入"})))
    assert not apart.rhyme_ok and apart.problems == ["rhyme sets 1 and 2 should rhyme in one 词林正韵 部"]
    assert check_ci(tune, format_ci(tune, _lines_for(tune, {0: "第二部平", 1: "第二部仄"}))).rhyme_ok


def test_format_ci_marks_and_newline():
    tune = TUNES["浣溪沙"]
    lines = _lines_for(tune)
    text = format_ci(tune, lines)
    # The corpus (全宋词's punctuation) closes every rhyme line with 。 and the others with ，
    assert [line.mark for line in tune.lines] == list("。。。，。。")
    assert text == "".join(lines[i] + "。" for i in range(3)) + "\n" + lines[3] + "，" + lines[4] + "。" + lines[5] + "。"
    with pytest.raises(ValueError, match="6 lines"):
        format_ci(tune, lines[:5])


def test_check_accepts_other_punctuation():
    tune = TUNES["菩萨蛮"]
    lines = _lines_for(tune)
    text = "；".join(lines[:3]) + "？\n" + "、".join(lines[3:6]) + "！" + lines[6] + "：" + lines[7] + "。\n"
    assert check_ci(tune, text).ok


def test_check_finds_a_wrong_length():
    tune = TUNES["鹧鸪天"]
    lines = _lines_for(tune)
    lines[4] = lines[4][:-1] + "天天"
    result = check_ci(tune, format_ci(tune, lines))
    assert not result.structure_ok and not result.ok
    assert any("line 5 has 4 characters, should have 3" in p for p in result.problems)
    missing = check_ci(tune, format_ci(tune, _lines_for(tune))[:-9])
    assert not missing.structure_ok and not missing.rhyme_ok
    assert any("8 lines" in p for p in missing.problems)


def test_check_finds_a_non_rhyme():
    tune = TUNES["浣溪沙"]
    lines = _lines_for(tune)
    lines[4] = lines[4][:-1] + "月"  # an 入声 character at a 平 rhyme position
    result = check_ci(tune, format_ci(tune, lines))
    assert result.structure_ok and not result.rhyme_ok
    assert any("rhyme set 1" in p for p in result.problems)
    # rhymes of another 部 in the second of 菩萨蛮's 仄 sets are fine; mixing 部 within one set is not
    p = TUNES["菩萨蛮"]
    fine = _lines_for(p, {2: "第十七部入"})
    assert check_ci(p, format_ci(p, fine)).rhyme_ok
    bad = list(fine)
    bad[5] = bad[5][:-1] + "雪"  # 第十八部 against line 5's 第十七部
    assert not check_ci(p, format_ci(p, bad)).rhyme_ok


def test_check_tone_agreement_counts_strong_positions():
    tune = TUNES["浣溪沙"]
    lines = _lines_for(tune)
    line = tune.lines[0]
    pos = next(i for i, mark in enumerate(line.tones) if mark in "平仄" and i < line.length - 1)
    flipped = OBLIQUE_CHARS[0] if line.tones[pos] == "平" else LEVEL_CHARS[0]
    lines[0] = lines[0][:pos] + flipped + lines[0][pos + 1:]
    strong = sum(mark != "·" for tl in tune.lines for mark in tl.tones)
    result = check_ci(tune, format_ci(tune, lines))
    assert result.tone_agreement == pytest.approx(1 - 1 / strong)
    both = next(ch for ch, info in sorted(pingshui_table().items())
                if info.level and info.oblique and to_simplified(ch) == ch)
    lines[0] = lines[0][:pos] + both + lines[0][pos + 1:]
    assert check_ci(tune, format_ci(tune, lines)).tone_agreement == 1.0  # either reading matches


def test_tunes_table_lists_every_tune(capsys):
    assert trainer_main(["tunes", "table"]) == 0
    out = capsys.readouterr().out
    rows = [row for row in out.splitlines() if row.startswith("| ") and not row.startswith(("| tune", "| ---"))]
    assert len(rows) == len(TUNES)
    assert any(row.startswith("| 浣溪沙 |") and "7,7,7 \\| 7,7,7" in row and "平12356" in row for row in rows)


def test_docs_hold_the_current_table():
    docs = TUNES_JSON.parents[2] / "docs" / "CI.md"
    assert derivation.table(TUNES_JSON) in docs.read_text(encoding="utf-8")


def test_tunes_check_gives_the_corpus_baseline(fixture_corpus, capsys):
    root, out, _ = fixture_corpus
    assert trainer_main(["tunes", "check", "--corpus", str(root), "--split", "train", "--tunes", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["测试甲"]["poems"] == 46
    assert result["测试甲"]["structure_ok"] == pytest.approx(42 / 46, abs=1e-3)
    assert result["测试甲"]["rhyme_ok"] == 1.0 and result["测试乙"]["rhyme_ok"] == 1.0
    assert result["测试甲"]["tone_agreement"] == 1.0


def test_tunes_check_counts_failed_rhymes(tmp_path, capsys):
    tune, rng = TUNES["浣溪沙"], random.Random(5)
    records = []
    while len(records) < 4:
        lines = _lines_for(tune, {0: rng.choice(LEVEL_RHYMES)})
        if len(records) % 2:
            lines[5] = lines[5][:-1] + "月"
        record = _record("浣溪沙", lines, [line.mark for line in tune.lines], "train")
        if record and rng.random() < 0.5:
            records.append(record)
    (tmp_path / "ci.song.0.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    assert trainer_main(["tunes", "check", "--corpus", str(tmp_path), "--split", "train"]) == 0
    result = json.loads(capsys.readouterr().out)
    strong = sum(mark != "·" for line in tune.lines for mark in line.tones)  # 月 is 仄 at a strong 平 end
    assert result["浣溪沙"] == {"poems": 4, "structure_ok": 1.0, "rhyme_ok": 0.5,
                               "tone_agreement": round(1 - 0.5 / strong, 3)}
