"""词 by tune: every tune's structure, rhyme and strong tones in every mode, the opening and keywords, the
request contract, the engine (batched with 诗, seeded) and GET /v1/tunes."""

from __future__ import annotations

import asyncio

import pytest

from engine.api import PoemRequest
from engine.errors import RequestError
from engine.model import versions as store
from engine.model.checkpoint import load_checkpoint
from engine.poem.forms import FORMS, classify
from engine.poem.prosody import prosody_for
from engine.poem.rhymes import char_info
from engine.poem.tunes import TUNES, check_ci, parse_tune
from engine.reference import generate_one
from engine.serving.local import LocalEngine
from engine_fixtures import engine_settings

MODES = ("greedy", "sample", "beam")


@pytest.fixture(scope="module")
def ci_model(tiny_ci_checkpoint):
    ckpt = load_checkpoint(tiny_ci_checkpoint)
    return ckpt.model, ckpt.vocab, prosody_for(ckpt.vocab)


def write(ci_model, **fields):
    model, vocab, prosody = ci_model
    return generate_one(model, vocab, prosody, PoemRequest(form="ci", **fields).validate())


def strong_tones_kept(tune, lines) -> bool:
    for line, pattern in zip(lines, tune.lines):
        for ch, mark in zip(line, pattern.tones):
            info = char_info(ch)
            if mark != "·" and not (info and ((mark == "平" and info.level) or (mark == "仄" and info.oblique))):
                return False
    return True


@pytest.mark.parametrize("tune", list(TUNES))
def test_every_tune_is_written_with_its_structure_rhymes_and_strong_tones_in_every_mode(ci_model, tune):
    t = TUNES[tune]
    for i, mode in enumerate(MODES):
        result = write(ci_model, tune=tune, mode=mode, beam_width=3, seed=i)
        check = check_ci(t, result.poem)
        assert check.structure_ok and result.form == "ci" and result.tune == tune, (mode, result.poem)
        relaxed = " ".join(result.notes)
        assert check.rhyme_ok or "rhyme" in relaxed, (mode, result.poem, check.problems)
        assert strong_tones_kept(t, result.lines) or "tone" in relaxed, (mode, result.poem)
        # The text keeps the tune's marks, and the stanza break is a newline.
        stanzas = result.poem.split("\n")
        assert len(stanzas) == len(t.stanzas) and all(s[-1] in "，。" for s in stanzas)


def test_xijiangyue_rhymes_its_level_and_oblique_lines_in_one_bu(ci_model):
    tune = TUNES["西江月"]
    kept = 0
    for seed in range(12):
        for mode in MODES:
            result = write(ci_model, tune="西江月", mode=mode, beam_width=3, seed=seed)
            check = check_ci(tune, result.poem)
            # The tiny vocabulary holds few 仄 rhymes of some 部, so a line may relax the rhyme, with a note.
            relaxed = any("rhyme" in n for n in result.notes)
            assert check.rhyme_ok or relaxed, (mode, result.poem, check.problems)
            kept += not relaxed
    assert kept >= 24  # most kept the rule outright (without the link, most broke it)


def test_a_rhyme_of_two_bu_leaves_both_open_to_the_linked_set_until_a_later_rhyme_decides():
    from engine.model.checkpoint import PACKAGE_CHECKPOINTS, read_meta
    from engine.poem.constraints import build_plan
    from engine.poem.vocab import Vocab

    vocab = Vocab(read_meta(PACKAGE_CHECKPOINTS / "ci.safetensors")["vocab"])  # the real characters, no weights
    plan = build_plan(vocab, prosody_for(vocab), PoemRequest(form="ci", tune="西江月", prompt="一曲江头过眼十分明月天涯",
                                                            mode="greedy").validate())
    row = plan.new_row()
    while row.forced() is not None and row.forced() != vocab.eos_id:
        row.advance(row.forced())
    bus = lambda k: {plan.book.bu(g) for g in row.rhyme_groups[k]}  # noqa: E731
    assert {"第三部", "第十部"} <= bus(1) == bus(0)  # 涯: 支 (三部) and 佳 (十部); the 仄 set may follow either
    for ch in "几年归去与君家":  # 家 (麻, 十部) decides
        row.advance(vocab.index[ch])
    assert bus(0) == bus(1) == {"第十部"}


@pytest.mark.parametrize("prompt", ["", "山水花风云春秋天人江明台", "山水花风云春秋天人江河何"])
def test_any_walk_through_the_masks_keeps_xijiangyue_in_one_bu_or_says_why_not(prompt):
    # Every token a row's mask allows, at random: 台 is in 三部 and 五部 (and 五部 has no 仄 rhymes here);
    # 何, forced at a rhyme, opens 九部, where nothing 仄 can follow.
    import random

    from conftest import FIXTURE_CHARS
    from engine.poem.constraints import build_plan, mask_tables
    from engine.poem.vocab import Vocab

    vocab = Vocab.build([FIXTURE_CHARS]).grown([], tunes=["西江月"], ci=True)
    prosody = prosody_for(vocab)
    tables = mask_tables(prosody)
    plan = build_plan(vocab, prosody, PoemRequest(form="ci", tune="西江月", prompt=prompt, mode="greedy").validate())
    for seed in range(200 if prompt else 3000):
        row, rng = plan.new_row(), random.Random(seed)
        while not row.done:
            token = row.forced()
            if token is None:
                token = rng.choice(sorted(set(tables.allowed_ids(row.mask_index)) - set(row.step_banned)))
            row.advance(token)
        check = check_ci(TUNES["西江月"], plan.format_text(row.line_texts))
        noted = any("rhyme" in n for n in row.notes)
        assert check.rhyme_ok or noted, (seed, row.line_texts, check.problems)
        bus = [{plan.book.bu(g) for g in row.rhyme_groups[k]} for k in (0, 1)]
        assert bus[0] & bus[1] or noted, (seed, row.line_texts, bus)


def test_a_free_rhyme_of_two_groups_keeps_only_the_group_whose_bu_the_link_allows():
    from conftest import FIXTURE_CHARS
    from engine.poem.constraints import build_plan
    from engine.poem.vocab import Vocab

    vocab = Vocab.build([FIXTURE_CHARS]).grown([], tunes=["西江月"], ci=True)
    plan = build_plan(vocab, prosody_for(vocab), PoemRequest(form="ci", tune="西江月", mode="greedy").validate())
    five = {g for g, name in enumerate(plan.book.groups) if name == "第五部平"}
    assert five and not five & plan.eligible_groups[0]  # 五部 has no 仄 rhymes in this vocabulary: closed
    row = plan.new_row()
    for ch in "山水花风云春，秋天人江明台":  # 台: 三部 and 五部; a free choice, as the mask allows it
        row.advance(vocab.index[ch] if ch != "，" else vocab.comma_id)
    assert row.rhyme_groups[0] <= plan.eligible_groups[0]
    assert {plan.book.bu(g) for g in row.rhyme_groups[1]} == {"第三部"}


def test_the_tiny_model_keeps_every_rule_without_relaxing_any(ci_model):
    """On the fixture's characters nothing needs to bend for the common tunes that rhyme on 平 (its few 入声
    characters run out in a long 仄 tune such as 满江红, and that tune then relaxes with a note)."""
    level = [name for name, t in TUNES.items() if set(t.rhyme_tones) == {1}][:8]
    assert len(level) >= 5
    for tune in level:
        result = write(ci_model, tune=tune, mode="sample", seed=5)
        assert not result.notes, (tune, result.notes)
        assert check_ci(TUNES[tune], result.poem).ok and strong_tones_kept(TUNES[tune], result.lines)


def test_a_ci_opens_with_the_prompt_across_line_ends_and_holds_every_keyword(ci_model):
    result = write(ci_model, tune="浣溪沙", prompt="春风明月夜花开", keywords=["孤舟", "雁"], mode="beam", seed=1)
    assert "".join(result.lines).startswith("春风明月夜花开")
    assert all(k in "".join(result.lines) for k in ("孤舟", "雁")) and check_ci(TUNES["浣溪沙"], result.poem).structure_ok
    # A 2-character keyword never straddles a line end.
    assert any("孤舟" in line for line in result.lines)


def test_the_same_seed_gives_the_same_ci(ci_model):
    a = write(ci_model, tune="菩萨蛮", mode="sample", seed=42)
    b = write(ci_model, tune="菩萨蛮", mode="sample", seed=42)
    c = write(ci_model, tune="菩萨蛮", mode="sample", seed=43)
    assert a.poem == b.poem and a.poem != c.poem


def test_a_refrain_line_may_repeat_the_line_before_but_a_long_line_never_repeats(ci_model):
    # 如梦令's two-character refrain (知否，知否): forcing it through the prompt is not a repetition note.
    tune = parse_tune("如梦令")
    lengths = tune.line_lengths
    k = lengths.index(2)
    assert lengths[k + 1] == 2
    text = "".join(write(ci_model, tune="如梦令", mode="sample", seed=s).poem for s in range(3))
    assert text  # written
    for seed in range(5):
        lines = write(ci_model, tune="水调歌头", mode="sample", seed=seed).lines
        long = [line for line in lines if len(line) > 2]
        assert len(set(long)) == len(long)


@pytest.mark.parametrize("fields,code,field", [
    ({"form": "ci"}, "bad_tune", "tune"),
    ({"form": "ci", "tune": "不存在调"}, "bad_tune", "tune"),
    ({"form": "qijue", "tune": "浣溪沙"}, "bad_tune", "tune"),
    ({"form": "ci", "tune": "浣溪沙", "acrostic": "春夏秋冬"}, "bad_acrostic", "acrostic"),
    ({"form": "ci", "tune": "如梦令", "prompt": "一二三四五六七八九十百千万亿"}, None, None),
    ({"form": "ci", "tune": 7}, "bad_type", "tune"),
    ({"form": "ci", "tune": "十六字令", "keywords": ["春风", "秋月", "明日", "江山"]}, "bad_tune", "tune"),
])
def test_a_bad_ci_request_is_refused_naming_the_field(fields, code, field):
    if code is None:
        PoemRequest.from_dict(fields)  # a long prompt fits a long enough tune
        return
    with pytest.raises(RequestError) as e:
        PoemRequest.from_dict(fields)
    assert (e.value.code, e.value.field) == (code, field)


def test_a_tune_is_found_by_its_traditional_name_and_normalised():
    request = PoemRequest.from_dict({"form": "词", "tune": "浣溪紗"})
    assert (request.form, request.tune) == ("ci", "浣溪沙")


def test_a_shi_model_asked_for_a_ci_says_which_model_can(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    with pytest.raises(RequestError) as e:
        generate_one(ckpt.model, ckpt.vocab, prosody_for(ckpt.vocab), PoemRequest(form="ci", tune="浣溪沙").validate())
    assert e.value.code == "no_ci"


@pytest.fixture
def ci_store(tmp_path, tiny_checkpoint, tiny_ci_checkpoint):
    root = tmp_path / "checkpoints"
    store.publish(root, "lstm", tiny_checkpoint)
    store.publish(root, "ci", tiny_ci_checkpoint)
    return root


async def test_the_engine_sends_a_ci_to_the_model_that_writes_ci_batched_with_shi_and_seeded(ci_store):
    requests = [PoemRequest(form="ci", tune=t, mode=m, beam_width=3, seed=i)
                for i, (t, m) in enumerate(zip(["浣溪沙", "菩萨蛮", "水调歌头", "鹧鸪天"] * 3, MODES * 4))]
    requests += [PoemRequest(form="qijue", mode=m, seed=i) for i, m in enumerate(MODES)]
    async with LocalEngine(engine_settings(ci_store, model_names=("lstm", "ci"))) as engine:
        together = await asyncio.gather(*(engine.generate(r) for r in requests))
        alone = [await engine.generate(r) for r in requests]
        models = {m["name"]: m for m in await engine.models()}
    assert models["ci"]["writes_ci"] and not models["lstm"]["writes_ci"]
    for request, a, b in zip(requests, together, alone):
        assert (a.poem, a.score) == (b.poem, b.score), request
        if request.form == "ci":
            assert a.model["name"] == "ci" and check_ci(TUNES[request.tune], a.poem).structure_ok
        else:
            assert a.model["name"] == "lstm" and classify(a.lines) is FORMS["qijue"]


async def test_without_a_ci_model_a_ci_request_is_refused(tmp_path, tiny_checkpoint):
    root = tmp_path / "checkpoints"
    store.publish(root, "lstm", tiny_checkpoint)
    async with LocalEngine(engine_settings(root, model_names=("lstm",))) as engine:
        with pytest.raises(RequestError) as e:
            await engine.generate(PoemRequest(form="ci", tune="浣溪沙"))
    assert e.value.code == "no_ci" and "ENGINE_MODELS" in e.value.message


def walk(ci_model, tune: str, choose, rhyme: bool = True) -> list[str]:
    """Write a 词 by hand: `choose(row, allowed)` picks each free token from what the row allows."""
    from engine.poem.constraints import build_plan

    _, vocab, prosody = ci_model
    plan = build_plan(vocab, prosody, PoemRequest(form="ci", tune=tune, seed=0, rhyme=rhyme))
    row = plan.new_row()
    while not row.done:
        token = row.forced()
        if token is None:
            allowed = sorted(set(plan.tables.allowed_ids(row.mask_index)) - set(row.step_banned))
            token = choose(row, allowed)
        row.advance(token)
    return row.line_texts


def test_a_refrain_may_repeat_the_line_before_although_it_rhymes(ci_model):
    """如梦令's lines 5 and 6 (two characters, both rhyming): 知否，知否 is allowed, 重韵 notwithstanding."""
    layout = TUNES["如梦令"].layout

    def choose(row, allowed):
        line, col = layout.line_of[row.pos], layout.col_of[row.pos]
        if line == 5:
            want = row.lines[4][col]
            assert want in allowed, (col, row.plan.vocab.tokens[want])
            return want
        return allowed[len(row.tokens) * 7 % len(allowed)]

    lines = walk(ci_model, "如梦令", choose)
    assert lines[4] == lines[5] and check_ci(TUNES["如梦令"], "，".join(lines) + "。").structure_ok


def test_a_short_line_never_repeats_an_earlier_line_other_than_the_one_before(ci_model):
    """南乡子's lines 4 and 9 are two characters each: line 9 cannot end as line 4 did (rhyme off, so that
    the ban on a rhyme character twice does not hide this one)."""
    layout = TUNES["南乡子"].layout

    def choose(row, allowed):
        line, col = layout.line_of[row.pos], layout.col_of[row.pos]
        if line == 8:
            want = row.lines[3][col]
            if col == 1:
                assert want not in allowed
                return allowed[0]
            return want
        return allowed[len(row.tokens) * 7 % len(allowed)]

    lines = walk(ci_model, "南乡子", choose, rhyme=False)
    assert lines[8] != lines[3] and lines[8][0] == lines[3][0]
