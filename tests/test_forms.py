"""The four regular forms: names and aliases, line splitting, classification and layout."""

import pytest

from engine.poem.forms import (DEFAULT_FORM, FORM_NAMES, FORMS, classify, format_poem, parse_form, punctuation_at,
                          split_lines)


@pytest.mark.parametrize("name,expected", [
    ("wujue", "wujue"), ("五绝", "wujue"), ("五言绝句", "wujue"), ("五言絕句", "wujue"),
    ("qijue", "qijue"), ("七绝", "qijue"), ("七言绝句", "qijue"), ("  QIJUE ", "qijue"),
    ("wulv", "wulv"), ("五律", "wulv"), ("五言律诗", "wulv"), ("五言律詩", "wulv"),
    ("qilv", "qilv"), ("七律", "qilv"), ("七言律诗", "qilv"), ("七言律詩", "qilv"),
])
def test_parse_form_accepts_contract_names_chinese_names_and_aliases(name, expected):
    assert parse_form(name).name == expected


@pytest.mark.parametrize("name", ["", "ci", "五言", "qijue2", "sonnet"])
def test_parse_form_rejects_unknown_names_listing_the_allowed_ones(name):
    with pytest.raises(ValueError, match="allowed: wujue"):
        parse_form(name)


@pytest.mark.parametrize("name,lines,length,chars,text_len", [
    ("wujue", 4, 5, 20, 24), ("qijue", 4, 7, 28, 32), ("wulv", 8, 5, 40, 48), ("qilv", 8, 7, 56, 64),
])
def test_each_form_has_the_contract_shape(name, lines, length, chars, text_len):
    form = FORMS[name]
    assert (form.num_lines, form.line_len, form.num_chars, form.text_len) == (lines, length, chars, text_len)


def test_form_names_and_default_are_the_contract_ones():
    assert FORM_NAMES == ("wujue", "qijue", "wulv", "qilv")
    assert DEFAULT_FORM in FORMS


@pytest.mark.parametrize("text,expected", [
    ("床前明月光，疑是地上霜。", ["床前明月光", "疑是地上霜"]),
    ("何处是归程？长亭更短亭！", ["何处是归程", "长亭更短亭"]),
    ("一二三；四五六、七八九:十", ["一二三", "四五六", "七八九", "十"]),
    ("，，春眠。。 ", ["春眠"]),
    ("", []),
])
def test_split_lines_cuts_at_every_line_mark_and_drops_empty_pieces(text, expected):
    assert split_lines(text) == expected


@pytest.mark.parametrize("lines,expected", [
    (["白日依山尽", "黄河入海流", "欲穷千里目", "更上一层楼"], "wujue"),
    (["朝辞白帝彩云间", "千里江陵一日还", "两岸猿声啼不住", "轻舟已过万重山"], "qijue"),
    (["一二三四五"] * 8, "wulv"),
    (["一二三四五六七"] * 8, "qilv"),
    (["一二三四五"] * 6, None),  # six lines: no regular form
    (["一二三四五", "一二三四五六七"] * 2, None),  # uneven lines
    (["一二三四"] * 4, None),  # four characters a line
    ([], None),
])
def test_classify_recognises_the_four_forms_and_nothing_else(lines, expected):
    form = classify(lines)
    assert (form.name if form else None) == expected


def test_format_poem_closes_odd_lines_with_comma_and_even_lines_with_period():
    assert format_poem(["白日依山尽", "黄河入海流", "欲穷千里目", "更上一层楼"]) == "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
    form = FORMS["wulv"]
    assert [punctuation_at(form, i) for i in range(8)] == ["，", "。"] * 4


def test_split_lines_undoes_format_poem():
    lines = ["朝辞白帝彩云间", "千里江陵一日还", "两岸猿声啼不住", "轻舟已过万重山"]
    assert split_lines(format_poem(lines)) == lines
