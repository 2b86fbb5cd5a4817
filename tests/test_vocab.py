"""The character vocabulary: its fixed head, build order, encode/decode round trip and validation."""

import pytest

from engine.poem.vocab import CI_TOKEN, FORM_TOKENS, PUNCTUATION, SPECIALS, Vocab, form_token, is_han, tune_token

HEAD = [*SPECIALS, *FORM_TOKENS, *PUNCTUATION]


def test_vocabulary_starts_with_specials_form_tokens_and_line_marks():
    vocab = Vocab.build(["月"])
    assert vocab.tokens[: len(HEAD)] == HEAD
    assert vocab.tokens[vocab.pad_id] == "<pad>" and vocab.tokens[vocab.eos_id] == "<eos>"
    assert vocab.first_han_id == len(HEAD)
    assert [vocab.form_id(n) for n in ("wujue", "qijue", "wulv", "qilv")] == [vocab.index[form_token(n)] for n in
                                                                              ("wujue", "qijue", "wulv", "qilv")]


def test_build_orders_characters_by_frequency_then_code_point():
    vocab = Vocab.build(["山山山水水月", "花月"])
    # 山 ×3; 水 and 月 ×2 (tie: 月 U+6708 before 水 U+6C34); 花 ×1
    assert vocab.tokens[vocab.first_han_id:] == ["山", "月", "水", "花"]


def test_build_applies_min_count_and_max_size():
    texts = ["山山山水水月"]
    assert vocab_chars(Vocab.build(texts, min_count=2)) == ["山", "水"]
    assert vocab_chars(Vocab.build(texts, max_size=len(HEAD) + 1)) == ["山"]


def vocab_chars(vocab):
    return vocab.tokens[vocab.first_han_id:]


def test_build_ignores_punctuation_latin_and_symbols():
    vocab = Vocab.build(["月，光。abc 123 □ 〖注〗"])
    assert vocab_chars(vocab) == sorted(["月", "光", "注"], key=lambda c: c)


@pytest.mark.parametrize("text", ["床前明月光，疑是地上霜。", "月", "，。", ""])
def test_encode_then_decode_gives_the_text_back(text):
    vocab = Vocab.build(["床前明月光疑是地上霜"])
    assert vocab.decode(vocab.encode(text)) == text


def test_unknown_characters_encode_as_unk_and_decode_to_nothing():
    vocab = Vocab.build(["月光"])
    ids = vocab.encode("月龘光")
    assert ids[1] == vocab.unk_id
    assert vocab.decode(ids) == "月光"


def test_decode_skips_specials_and_form_tokens():
    vocab = Vocab.build(["月"])
    assert vocab.decode([vocab.form_id("qijue"), vocab.index["月"], vocab.comma_id, vocab.eos_id, vocab.pad_id]) == "月，"


def test_a_vocabulary_restored_from_its_tokens_is_the_same():
    vocab = Vocab.build(["春眠不觉晓处处闻啼鸟"])
    again = Vocab(list(vocab.tokens))
    assert again.tokens == vocab.tokens and again.index == vocab.index and len(again) == len(vocab)
    assert again.encode("春晓") == vocab.encode("春晓")
    assert "春" in again and "秋" not in again
    assert list(again.han_ids()) == list(range(again.first_han_id, len(again)))


@pytest.mark.parametrize("tokens,problem", [
    (["月", *HEAD], "must start with"),
    (HEAD[:-1], "must start with"),
    ([*HEAD, "月", "月"], "duplicate"),
    ([*HEAD, "a"], "non-Han"),
    ([*HEAD, "，"], "duplicate"),
    ([*HEAD, "<bos>"], "non-Han"),
    ([*HEAD, "<ci>", "月"], "tune tokens come last"),
    ([*HEAD, "月", "<ci:>"], "non-Han"),
])
def test_a_malformed_token_list_is_rejected(tokens, problem):
    with pytest.raises(ValueError, match=problem):
        Vocab(tokens)


@pytest.mark.parametrize("ch,expected", [("月", True), ("㐀", True), ("𠀀", True), ("，", False), ("a", False),
                                         ("□", False), ("😀", False), ("月光", False), ("", False)])
def test_is_han_accepts_single_cjk_ideographs_only(ch, expected):
    assert is_han(ch) is expected


def test_a_grown_vocabulary_keeps_every_token_and_puts_tune_tokens_after_the_han_characters():
    shi = Vocab.build(["山月"])
    ci = shi.grown(["阕", "月"], ["浣溪沙", "菩萨蛮"])
    assert ci.tokens[: len(shi)] == shi.tokens
    assert ci.tokens[len(shi):] == ["阕", CI_TOKEN, tune_token("浣溪沙"), tune_token("菩萨蛮")]
    assert list(ci.han_ids()) == list(range(ci.first_han_id, ci.index["阕"] + 1))
    assert ci.writes_ci and not shi.writes_ci
    assert ci.tune_id("浣溪沙") == ci.index[tune_token("浣溪沙")]
    assert ci.tune_id("六州") == ci.index[CI_TOKEN]  # a tune without its own token opens with <ci>
    assert Vocab(ci.tokens).end_han_id == ci.end_han_id
    # Growing again keeps the tune tokens last, new characters join the Han range.
    again = ci.grown(["鹧"], ["鹧鸪天"])
    assert again.tokens[again.end_han_id - 1] == "鹧" and again.tokens[-1] == tune_token("鹧鸪天")


def test_decode_leaves_tune_tokens_out():
    ci = Vocab.build(["月"]).grown([], ["浣溪沙"])
    assert ci.decode([ci.tune_id("浣溪沙"), ci.index["月"], ci.period_id, ci.eos_id]) == "月。"
