"""Constrained decoding rules, checked by walking rows through random allowed tokens (no model needed)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import ACROSTIC, make_poems
from conftest import DECODING_OPTIONS as OPTIONS

from engine.api import PoemRequest
from engine.errors import RequestError
from engine.poem.constraints import RHYME_BASE, build_plan
from engine.poem.forms import FORM_NAMES, FORMS, split_lines
from engine.poem.judge import check_poem
from engine.poem.prosody import prosody_for
from engine.poem.rhymes import char_info
from engine.poem.rhymes import pingshui_table
from engine.poem.vocab import FORM_TOKENS, PUNCTUATION, SPECIALS, Vocab, is_han
from engine.sampling.choice import step_bias


def allowed_masks(rows):
    """The tokens each row may take next, (N, V) bool, read off the bias the decoders use."""
    return step_bias(rows, 0.0, "cpu").dense() == 0



@pytest.fixture(scope="module")
def vocab():
    return Vocab.build(make_poems(400, seed=1))


def tiny_vocab(chars: str) -> Vocab:
    return Vocab([*SPECIALS, *FORM_TOKENS, *PUNCTUATION, *chars])


def plan_for(vocab, **fields):
    return build_plan(vocab, prosody_for(vocab), PoemRequest(**fields))


def walk(plan, seed: int = 0):
    """Take a random allowed token at every free step; returns the finished row."""
    rng = random.Random(seed)
    row = plan.new_row()
    while not row.done:
        token = row.forced()
        if token is None:
            allowed = allowed_masks([row])[0].nonzero().flatten().tolist()
            assert allowed, f"no token allowed at position {row.pos}"
            token = rng.choice(allowed)
        row.advance(token)
    return row




def fields_for(form: str, option: str) -> dict:
    fields = dict(OPTIONS[option], form=form)
    if fields.get("acrostic") is True:
        fields["acrostic"] = ACROSTIC[FORMS[form].num_lines]
    return fields


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("form", FORM_NAMES)
def test_every_random_walk_through_the_masks_is_a_valid_poem(vocab, form, option, seed):
    fields = fields_for(form, option)
    plan = plan_for(vocab, **fields)
    row = walk(plan, seed)
    check = check_poem(row.text, form, plan.prosody)
    assert check.form_valid, row.text
    assert not check.repeated_chars and not check.repeated_line, row.text
    assert check.rhyme or not fields.get("rhyme", True), row.text
    if fields.get("tone", True) and not row.notes:
        assert check.tone_agreement == 1.0, row.text
    assert row.text.replace("，", "").replace("。", "").startswith(plan.prompt)
    if plan.acrostic:
        assert "".join(line[0] for line in check.lines) == plan.acrostic


@pytest.mark.parametrize("form", FORM_NAMES)
def test_rhyme_characters_are_never_reused(vocab, form):
    for seed in range(5):
        lines = check_poem(walk(plan_for(vocab, form=form), seed).text, form).lines
        ends = [line[-1] for line in lines[1::2]]
        assert len(set(ends)) == len(ends)


@pytest.mark.parametrize("form", FORM_NAMES)
def test_forced_tokens_are_punctuation_at_line_ends_and_eos_at_the_end(vocab, form):
    f = FORMS[form]
    plan = plan_for(vocab, form=form, rhyme=False, tone=False)
    row = plan.new_row()
    for pos in range(plan.num_steps):
        forced = row.forced()
        if pos == f.text_len:
            assert forced == vocab.eos_id
        elif pos % (f.line_len + 1) == f.line_len:
            assert forced == (vocab.comma_id if (pos // (f.line_len + 1)) % 2 == 0 else vocab.period_id)
        else:
            assert forced is None
            forced = allowed_masks([row])[0].nonzero()[0].item()
        row.advance(forced)
    assert row.done


def test_masks_allow_only_han_characters_inside_lines(vocab):
    plan = plan_for(vocab, form="wujue", rhyme=False, tone=False)
    mask = allowed_masks([plan.new_row()])[0]
    assert not mask[: vocab.first_han_id].any()


def test_prompt_characters_open_the_poem_across_the_line_break(vocab):
    plan = plan_for(vocab, form="wujue", prompt="明月山水花风云")
    assert walk(plan).text.startswith("明月山水花，风云")


def test_acrostic_characters_start_every_line(vocab):
    plan = plan_for(vocab, form="wulv", acrostic="春山秋水东南西北")
    lines = check_poem(walk(plan).text, "wulv").lines
    assert [line[0] for line in lines] == list("春山秋水东南西北")


def test_prompt_punctuation_and_spaces_are_dropped(vocab):
    assert plan_for(vocab, form="wujue", prompt="明月山水花， 风").prompt == "明月山水花风"


@pytest.mark.parametrize("prompt, expected", [("東風", "东风"), ("長江", "长江"), ("雲山", "云山")])
def test_traditional_prompt_is_converted_to_simplified(vocab, prompt, expected):
    assert plan_for(vocab, prompt=prompt).prompt == expected


def test_traditional_acrostic_is_converted_to_simplified(vocab):
    assert plan_for(vocab, form="wujue", acrostic="東風雲山").acrostic == "东风云山"


@pytest.mark.parametrize("fields, code, field, named", [
    ({"prompt": "月😀"}, "bad_character", "prompt", "😀"),
    ({"prompt": "moon"}, "bad_character", "prompt", "m"),
    ({"prompt": "月1"}, "bad_character", "prompt", "1"),
    ({"prompt": "犇"}, "unknown_character", "prompt", "犇"),
    ({"prompt": "明月犇"}, "unknown_character", "prompt", "犇"),
    ({"prompt": "明" * 15}, "prompt_too_long", "prompt", "15"),
    ({"form": "wujue", "acrostic": "春山秋"}, "bad_acrostic", "acrostic", "3"),
    ({"form": "wujue", "acrostic": "春山秋水东南西北"}, "bad_acrostic", "acrostic", "wujue"),
    ({"form": "wujue", "acrostic": "春山秋犇"}, "unknown_character", "acrostic", "犇"),
    ({"form": "wujue", "acrostic": "春山秋A"}, "bad_character", "acrostic", "A"),
    ({"form": "wujue", "acrostic": "春山秋水", "prompt": "月"}, "bad_acrostic", "acrostic", "not both"),
    ({"form": "sonnet"}, "bad_form", "form", "sonnet"),
])
def test_bad_input_gives_its_error_naming_the_problem(vocab, fields, code, field, named):
    with pytest.raises(RequestError) as e:
        plan_for(vocab, **fields)
    assert (e.value.code, e.value.field) == (code, field)
    assert named in e.value.message


def test_traditional_character_whose_simplified_form_is_unknown_is_named_in_both_scripts(vocab):
    with pytest.raises(RequestError) as e:
        plan_for(vocab, prompt="鬱")
    assert e.value.code == "unknown_character" and "鬱" in e.value.message and "郁" in e.value.message


def test_prompt_breaking_the_tone_pattern_relaxes_it_there_with_a_note(vocab):
    # 东 (平) fixes s = 平 at line 1's 2nd character, so the 4th must be 仄; 风 is 平.
    plan = plan_for(vocab, form="wujue", prompt="山东月风")
    assert any(n.startswith("tone:") and "「风」" in n for n in plan.notes)
    assert check_poem(walk(plan).text, "wujue").form_valid


def test_prompt_that_fits_the_tone_pattern_adds_no_note(vocab):
    assert plan_for(vocab, form="wujue", prompt="山东风月").notes == []


def test_prompt_ending_a_rhyme_line_off_the_rhyme_relaxes_it_with_a_note(vocab):
    # Line 2 ends in 月, an oblique character: it cannot rhyme.
    plan = plan_for(vocab, form="wujue", prompt="山东风月花" + "秋江云水月")
    assert any(n.startswith("rhyme:") for n in plan.notes)
    assert check_poem(walk(plan).text, "wujue").form_valid


def test_acrostic_character_forced_three_times_relaxes_repetition_with_a_note(vocab):
    plan = plan_for(vocab, form="wujue", acrostic="月月月山")
    assert any(n.startswith("repetition:") and "「月」" in n for n in plan.notes)
    row = walk(plan)
    assert check_poem(row.text, "wujue").form_valid and row.text.count("月") == 3


def test_characters_forced_later_are_reserved_against_a_third_use(vocab):
    plan = plan_for(vocab, form="wujue", acrostic="山月月水")
    for seed in range(5):
        assert walk(plan, seed).text.count("月") == 2


def test_prompt_repeating_a_line_is_noted(vocab):
    plan = plan_for(vocab, form="wulv", prompt="山水花风云" * 2)
    assert any("repeats line 1" in n for n in plan.notes)


@pytest.mark.parametrize("chars", ["月", "东", "月东", "东风", "月雪花", "明月山水"])
@pytest.mark.parametrize("form", FORM_NAMES)
@pytest.mark.parametrize("tone", [True, False])
def test_a_row_on_a_tiny_vocabulary_never_runs_out_of_tokens(chars, form, tone):
    vocab = tiny_vocab(chars)
    plan = plan_for(vocab, form=form, tone=tone)
    for seed in range(3):
        row = walk(plan, seed)  # asserts a token is allowed at every step
        assert check_poem(row.text, form).form_valid
        assert row.notes, "so few characters cannot keep every rule"


def test_relaxations_go_tone_first_then_rhyme(vocab):
    # Only level characters: odd line ends need 仄 → tone relaxes; the rhyme (level) still holds.
    v = tiny_vocab("东风山阳香")
    row = walk(plan_for(v, form="wujue"))
    assert any(n.startswith("tone:") for n in row.notes)
    assert check_poem(row.text, "wujue").rhyme


def test_batched_masks_equal_single_row_masks(vocab):
    rows = []
    for i, form in enumerate(FORM_NAMES * 3):
        row = plan_for(vocab, form=form, acrostic=None if i % 2 else ACROSTIC[FORMS[form].num_lines]).new_row()
        rng = random.Random(i)
        for _ in range(rng.randrange(row.plan.num_steps - 1)):
            token = row.forced()
            row.advance(token if token is not None else rng.choice(allowed_masks([row])[0].nonzero().flatten().tolist()))
        rows.append(row)
    batch = allowed_masks(rows)
    assert batch.shape == (len(rows), len(vocab))
    for i, row in enumerate(rows):
        assert torch.equal(batch[i], allowed_masks([row])[0])


def test_forced_rows_get_a_one_hot_mask(vocab):
    row = plan_for(vocab, form="wujue", prompt="明").new_row()
    mask = allowed_masks([row])[0]
    assert mask.sum() == 1 and mask[vocab.index["明"]]


def test_a_copied_row_moves_on_independently(vocab):
    row = plan_for(vocab, form="wujue", tone=False).new_row()
    twin = row.copy()
    row.advance(vocab.index["月"])
    assert twin.pos == 0 and twin.tokens == [] and row.tokens == [vocab.index["月"]]


def test_advance_rejects_a_token_other_than_the_forced_one(vocab):
    row = plan_for(vocab, form="wujue", prompt="明").new_row()
    with pytest.raises(ValueError):
        row.advance(vocab.index["月"])


def test_advance_rejects_punctuation_inside_a_line(vocab):
    row = plan_for(vocab, form="wujue").new_row()
    with pytest.raises(ValueError):
        row.advance(vocab.comma_id)


def test_the_first_rhyme_fixes_the_group_for_later_rhymes(vocab):
    plan = plan_for(vocab, form="qilv", tone=False)
    row = walk(plan, seed=3)
    ends = check_poem(row.text, "qilv").lines[1::2]
    groups = [plan.prosody.char(line[-1]).groups for line in ends]
    assert frozenset.intersection(*groups)


@pytest.fixture(scope="module")
def big_vocab():
    """About 6000 characters, the size of a real model's vocabulary."""
    chars = sorted(c for c in pingshui_table() if is_han(c) and c <= "\u9fff")[:6000]
    return Vocab([*SPECIALS, *FORM_TOKENS, *PUNCTUATION, *chars])


def test_the_bias_of_256_rows_at_once_equals_the_bias_of_each_row_alone(big_vocab):
    # Speed is measured in docs/DECODING.md, not asserted here; this checks the batched path is exact.
    rng = random.Random(0)
    rows = []
    for i in range(256):
        plan = plan_for(big_vocab, form=FORM_NAMES[i % 4], mode="greedy")
        row = plan.new_row()
        for _ in range(rng.randrange(plan.num_steps - 1)):
            token = row.forced()
            row.advance(token if token is not None else rng.choice(allowed_masks([row])[0].nonzero().flatten().tolist()))
        rows.append(row)
    together = allowed_masks(rows)
    assert together.shape == (256, len(big_vocab))
    for k, row in enumerate(rows):
        assert torch.equal(together[k], allowed_masks([row])[0]), f"row {k} differs when batched"


def test_rhyme_rows_registered_from_many_threads_at_once_each_get_their_own_row():
    # Plans are made on the event loop's thread while the engine's thread prepares rows: both register
    # rhyme rows. A tiny switch interval makes the threads interleave inside the registration.
    import itertools
    import sys
    import threading

    from conftest import FIXTURE_CHARS
    from engine.poem.constraints import MaskTables
    from engine.poem.prosody import prosody_for, rhyme_book
    from engine.poem.vocab import Vocab

    vocab = Vocab.build([FIXTURE_CHARS]).grown([], tunes=["西江月"], ci=True)
    prosody = prosody_for(vocab)
    book = rhyme_book(prosody, vocab, "cilin")
    keys = [frozenset(c) for c in itertools.combinations(range(len(book.groups)), 2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(5):
            tables = MaskTables(prosody)
            barrier = threading.Barrier(8)

            def register(i, tables=tables, barrier=barrier):
                barrier.wait()
                for k in keys[i::8] + keys:
                    tables.rhyme_row(book, k)

            threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(tables.rows) == RHYME_BASE + len(keys)  # the fixed rows, then one per group set
            for k in keys:
                assert torch.equal(tables.rows[tables.rhyme_row(book, k)], book.matrix[sorted(k)].any(dim=0))
    finally:
        sys.setswitchinterval(interval)


def test_an_unrhymed_line_end_takes_no_character_commonly_read_level_while_another_is_left(vocab):
    """空 (kōng) and 乡 (xiāng) have a rare 仄 reading in 平水韵; at the end of a line that does not rhyme a
    reader hears them 平, so the line ends on a character that sounds 仄 whenever one is allowed."""
    from engine.poem.constraints import MASK_OBLIQUE, MASK_OBLIQUE_END

    heard = {t for t in ("空", "乡", "中", "思", "间") if t in vocab and plan_for(vocab).prosody.heard_level[vocab.index[t]]}
    assert heard == {"空", "乡", "中", "思"} & set(vocab.tokens)  # 间 is not in the fixture vocabulary
    ends_seen = set()
    for form in FORM_NAMES:
        plan = plan_for(vocab, form=form)
        for seed in range(20):
            row = walk(plan, seed)
            lines = split_lines(row.text)
            odd_ends = [line[-1] for i, line in enumerate(lines) if i % 2 == 0 and i > 0]
            assert not set(odd_ends) & heard, row.text
            if lines[0][-1] in heard:  # line 1 may end 平 only as the poem's first rhyme (首句入韵)
                assert char_info(lines[0][-1]).groups & char_info(lines[1][-1]).groups, row.text
            ends_seen.update(odd_ends)
    assert len(ends_seen) > 5  # the walks did reach many line ends
    # Only heard-level characters are 仄 at all: the plain 仄 row serves (the tone rule is not dropped there).
    plan = plan_for(tiny_vocab("空乡东风山阳香"), form="wujue", rhyme=False)
    assert {split_lines(walk(plan, seed).text)[0][-1] for seed in range(10)} <= {"空", "乡"}
    assert MASK_OBLIQUE_END != MASK_OBLIQUE


def test_heard_level_is_both_tones_with_a_common_level_reading():
    from engine.poem.rhymes import heard_level

    assert all(heard_level(c) for c in "空乡间中深")
    assert not any(heard_level(c) for c in "看过望")  # both tones, commonly read 仄: 看 kàn
    assert not any(heard_level(c) for c in "急月日")  # 仄 only (入声), whatever Mandarin reads today
    assert not any(heard_level(c) for c in "东山")  # 平 only


def test_line_one_may_rhyme_and_then_opens_the_rhyme_that_the_even_lines_keep(vocab):
    """首句入韵, the norm of 七言: line 1 ends 仄, or in a 平 character of a group with room for one rhyme
    more; when it rhymes, its group is the poem's, and its character is not rhymed again."""
    rhymed_first = 0
    for form in FORM_NAMES:
        plan = plan_for(vocab, form=form)
        assert plan.first_rhyme == FORMS[form].line_len - 1 and plan.first_rhyme_groups
        for seed in range(30):
            row = walk(plan, seed)
            lines = split_lines(row.text)
            check = check_poem(row.text, form, plan.prosody)
            assert check.rhyme and check.tone_agreement == 1.0 or row.notes, row.text
            first = char_info(lines[0][-1])
            if first and first.level and first.groups & char_info(lines[1][-1]).groups:
                rhymed_first += 1
                assert lines[0][-1] not in [line[-1] for line in lines[1::2]], row.text  # no 重韵
    assert rhymed_first > 5
    assert plan_for(vocab, form="qijue", rhyme=False).first_rhyme is None
    assert plan_for(vocab, form="qijue", tone=False).first_rhyme is None


def test_the_judge_takes_a_first_line_that_rhymes_as_fitting_the_tone_pattern():
    chusai = "秦时明月汉时关，万里长征人未还。但使龙城飞将在，不教胡马度阴山。"  # 首句入韵 (关 还 山)
    assert check_poem(chusai, "qijue").tone_agreement == 1.0
    off = "秦时明月汉时天，万里长征人未还。但使龙城飞将在，不教胡马度阴山。"  # 天 is 平 but not in 删
    assert check_poem(off, "qijue").tone_agreement < 1.0


def test_line_one_falls_back_to_the_plain_oblique_row_when_it_cannot_rhyme_or_sound_oblique():
    """No group with room for line 1 to rhyme, and only characters commonly read level among the 仄 ones: the
    tone rule was dropped at line 1's end (any character, with a note) instead of taking the plain 仄 row."""
    vocab = Vocab.build(["空中深思乡帆龙闻临行轻衣相离山花风云春秋天人"])
    prosody = prosody_for(vocab)
    for form in ("wulv", "qilv"):
        plan = plan_for(vocab, form=form)
        assert not plan.first_rhyme_groups
        for seed in range(5):
            row = walk(plan, seed)
            assert prosody.oblique[vocab.index[split_lines(row.text)[0][-1]]], row.text
            assert not any(n.startswith("tone:") and "line 1," in n for n in row.notes), row.notes


@pytest.mark.parametrize("form, prompt", [("wujue", "春山一片云秋水共长天"), ("qijue", "独坐高楼望远空万家灯火照山花"),
                                          ("wulv", "明月照江东白云满山花")])
def test_a_prompt_over_line_two_decides_whether_line_one_can_rhyme(vocab, form, prompt):
    """The prompt forces line 1's end (云, 空, 东: 平) and line 2's (天, 花: another group). Line 1 opened the
    rhyme, line 2 then broke it, and the poem did not rhyme. Line 1 rhymes only in a group line 2's forced
    character belongs to; else its 平 is a bent tone, and the poem rhymes with line 2."""
    chars = set(prompt) | set(vocab.tokens[vocab.first_han_id:vocab.end_han_id])
    v = Vocab.build(["".join(sorted(chars))])
    plan = plan_for(v, form=form, prompt=prompt)
    for seed in range(5):
        row = walk(plan, seed)
        assert check_poem(row.text, form, plan.prosody).rhyme, (row.text, row.notes)


# -- 次韵: the rhyme characters of a poem being answered, forced at the rhyming lines' ends -----------------------
RHYMES = {2: "城声", 3: "明城声", 4: "城声情名", 5: "明城声情名"}  # 下平声八庚, every one level only


@pytest.mark.parametrize("with_line_1", [False, True])
@pytest.mark.parametrize("form", FORM_NAMES)
def test_rhymes_end_the_rhyming_lines_in_order_and_line_1_rhymes_without_a_note(vocab, form, with_line_1):
    f = FORMS[form]
    rhymes = RHYMES[f.num_lines // 2 + with_line_1]
    plan = plan_for(vocab, form=form, rhymes=rhymes)
    for seed in range(40):
        row = walk(plan, seed)
        check = check_poem(row.text, form, plan.prosody)
        assert check.form_valid and check.rhyme and check.tone_agreement == 1.0, row.text
        ends = [line[-1] for line in check.lines]
        assert "".join(ends[i] for i in ([0] if with_line_1 else []) + list(range(1, f.num_lines, 2))) == rhymes
        assert with_line_1 or ends[0] not in rhymes, row.text  # a free line 1 never takes a later rhyme (重韵)
        # A forced first rhyme is 首句入韵, not a bent tone; nor are the even lines' rhymes notes.
        assert row.notes == [], row.notes


def test_rhymes_go_with_a_prompt_an_acrostic_and_keywords(vocab):
    plan = plan_for(vocab, form="wulv", prompt="白云", rhymes="城声情名", keywords=["明月"])
    row = walk(plan, 1)
    assert row.text.startswith("白云") and "明月" in row.text
    assert [line[-1] for line in check_poem(row.text, "wulv").lines[1::2]] == list("城声情名")
    row = walk(plan_for(vocab, form="qijue", acrostic="春山秋水", rhymes="城声"), 2)
    lines = check_poem(row.text, "qijue").lines
    assert "".join(line[0] for line in lines) == "春山秋水" and lines[1][-1] + lines[3][-1] == "城声"


def test_a_prompt_that_writes_the_rhyme_it_is_given_is_no_conflict(vocab):
    assert walk(plan_for(vocab, form="wujue", prompt="山东风月花秋江云水城", rhymes="城声"), 0).text.startswith(
        "山东风月花，秋江云水城。")


@pytest.mark.parametrize("fields, code, named", [
    ({"form": "wujue", "rhymes": "城"}, "bad_rhymes", "got 1"),
    ({"form": "wujue", "rhymes": "明城声情"}, "bad_rhymes", "got 4"),
    ({"form": "wulv", "rhymes": "城声情"}, "bad_rhymes", "4 characters, or 5"),
    ({"form": "wujue", "rhymes": "城城"}, "bad_rhymes", "城"),
    ({"form": "wujue", "rhymes": "鄉乡"}, "bad_rhymes", "乡"),  # one character once simplified
    ({"form": "wujue", "rhymes": "城月"}, "bad_rhymes", "月"),  # oblique only: the regular forms rhyme on 平
    ({"form": "wujue", "rhymes": "城犇"}, "unknown_character", "犇"),
    ({"form": "wujue", "rhymes": "城A"}, "bad_character", "A"),
    ({"form": "wujue", "prompt": "山东风月花秋江云水明", "rhymes": "城声"}, "bad_rhymes", "「明」"),
    ({"form": "ci", "tune": "浣溪沙", "rhymes": "城声"}, "bad_rhymes", "regular forms"),
    ({"form": "wujue", "rhymes": ["城", "声"]}, "bad_type", "list"),
])
def test_bad_rhymes_give_their_error_naming_the_problem(vocab, fields, code, named):
    with pytest.raises(RequestError) as e:
        plan_for(vocab, **fields)
    assert (e.value.code, e.value.field) == (code, "rhymes")
    assert named in e.value.message


def test_keywords_do_not_count_the_places_the_rhymes_hold(vocab):
    # A 14-character prompt leaves line 3's last place and line 4: six places, room for these six characters
    # (2-character keywords inside one line), but not beside the rhyme that ends line 4.
    fields = {"form": "wujue", "prompt": "山东风月花秋江云水城长空高远", "keywords": ["白雪", "青松", "寒", "香"]}
    row = walk(plan_for(vocab, **fields), 0)
    assert all(k in row.text for k in fields["keywords"])
    with pytest.raises(RequestError) as e:
        PoemRequest(**fields, rhymes="城声").validate()  # said before any plan is made, with the count
    assert e.value.code == "bad_keywords" and "leaves 5 places" in e.value.message
