"""Keywords placed anywhere in the poem: every mode and form, with and without a prompt or an acrostic, the same
poem alone or in a batch, clear 400s for keywords that are bad or cannot fit, and the bot's `/poem 月 舟 秋`."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from bot_fixtures import clock, make_settings, scripted_engine, store  # noqa: F401
from conftest import ACROSTIC
from engine_fixtures import checkpoint_store, engine_settings  # noqa: F401

from bot.commands import COMMANDS, Commands, Who, help_text
from engine.api import PoemRequest
from engine.errors import RequestError
from engine.model.checkpoint import load_checkpoint
from engine.poem.constraints import build_plan
from engine.poem.forms import FORM_NAMES, FORMS
from engine.poem.judge import check_poem
from engine.poem.prosody import prosody_for
from engine.reference import generate_one
from engine.serving.local import LocalEngine
from engine.serving.service import ServiceSettings, create_app

MODES = ("greedy", "sample", "beam")
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    return ckpt.model, ckpt.vocab, prosody_for(ckpt.vocab)


def write(tiny, **fields):
    model, vocab, prosody = tiny
    return generate_one(model, vocab, prosody, PoemRequest(**fields))


def holds(result, keyword: str) -> bool:
    """The keyword inside one line of the poem (a 2-character keyword never straddles a line mark)."""
    return any(keyword in line for line in result.lines)


OPENINGS = {"no prompt": {}, "prompt": {"prompt": "白云"}, "long prompt": {"prompt": "白云明月山水花风"},
            "acrostic": {"acrostic": True}}


@pytest.mark.parametrize("opening", OPENINGS)
@pytest.mark.parametrize("form", FORM_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_every_keyword_appears_in_every_mode_and_form(tiny, mode, form, opening):
    fields = dict(OPENINGS[opening], form=form, mode=mode, seed=3, beam_width=3, keywords=["孤舟", "秋", "雁", "寒"])
    if fields.get("acrostic") is True:
        fields["acrostic"] = ACROSTIC[FORMS[form].num_lines]
    result = write(tiny, **fields)
    for keyword in fields["keywords"]:
        assert holds(result, keyword), (keyword, result.poem)
    check = check_poem(result.poem, form, tiny[2])
    assert check.form_valid and check.rhyme and not check.repeated_chars, result.poem
    if "prompt" in fields:  # the prompt stays the opening
        assert "".join(result.lines).startswith(fields["prompt"])
    if "acrostic" in fields:
        assert "".join(line[0] for line in result.lines) == fields["acrostic"]


@pytest.mark.parametrize("form", FORM_NAMES)
@pytest.mark.parametrize("keywords", [["舟", "秋"], ["明月"], ["落日", "孤雁", "清", "天"]])
def test_keywords_go_where_their_tones_fit_so_no_rule_bends(tiny, form, keywords):
    # Every keyword here has a place its tones fit: placing it there leaves the poem without a note.
    for seed, mode in enumerate(MODES):
        result = write(tiny, form=form, mode=mode, seed=seed, beam_width=3, keywords=keywords)
        assert all(holds(result, k) for k in keywords), result.poem
        assert result.notes == [], (result.poem, result.notes)
        check = check_poem(result.poem, form, tiny[2])
        assert check.tone_agreement == 1.0 and check.rhyme, result.poem


def test_keywords_spread_over_the_lines(tiny):
    _, vocab, prosody = tiny
    plan = build_plan(vocab, prosody, PoemRequest(form="qijue", keywords=["舟", "秋", "雁", "寒"]))
    lines = sorted({pos // 8 for pos in plan.forced_at})
    assert lines == [0, 1, 2, 3], plan.forced_at


@pytest.mark.parametrize("form", FORM_NAMES)
def test_a_keyword_stays_whole_across_the_lines_pauses(tiny, form):
    # 五言 reads 2|3 and 七言 2|2|3: a two-character word placed across a pause reads as two broken words.
    # With room everywhere, no two-character keyword starts on a line's second character (or a 七言 line's
    # fourth): those places straddle a pause.
    _, vocab, prosody = tiny
    n = FORMS[form].line_len
    for keywords in (["明月"], ["落日", "孤雁"], ["江山", "花风", "白云"], ["寒", "秋风"]):
        for tone in (True, False):
            plan = build_plan(vocab, prosody, PoemRequest(form=form, tone=tone, keywords=keywords))
            starts = [p for p in plan.forced_at if p - 1 not in plan.forced_at and p + 1 in plan.forced_at]
            straddling = (1, 3) if n == 7 else (1,)
            assert starts and all(p % (n + 1) not in straddling for p in starts), (keywords, tone, plan.forced_at)


def test_a_keyword_with_no_place_its_tone_fits_is_placed_anyway_with_a_note(tiny):
    # 14 prompt characters leave six places in a 五绝: line 3's end (仄) and line 4. Six 平 characters fill
    # them, so one must stand where the pattern needs 仄: the tone rule bends there and says so.
    keywords = ["花风", "江山", "云", "天"]
    result = write(tiny, form="wujue", mode="greedy", seed=1, prompt="白日落水月鸟雁石木玉露雪去外", keywords=keywords)
    assert all(holds(result, k) for k in keywords), result.poem
    assert any(n.startswith("tone: the forced") and any(f"「{ch}」" in n for ch in "".join(keywords))
               for n in result.notes), result.notes


def test_every_request_validation_accepts_gets_every_keyword_placed_inside_one_line(tiny):
    # Placing a keyword must never take the room a later one needs (e.g. a single character splitting the
    # only free pair of a line): whatever validation accepts, the plan places.
    import random

    _, vocab, prosody = tiny
    rng, chars, placed = random.Random(5), "山水花风云天人江河日夜明清白青长空东西南北来去归飞流", 0
    for _ in range(400):
        form = FORMS[rng.choice(FORM_NAMES)]
        pool = rng.sample(chars, 14)
        acrostic = "".join(pool[:form.num_lines]) if rng.random() < 0.2 else None
        prompt = "" if acrostic else "".join(pool[:rng.randint(0, min(14, form.num_chars))])
        words = [("".join(rng.sample(chars, 2)) if rng.random() < 0.6 else rng.choice(chars)) for _ in range(rng.randint(1, 4))]
        request = PoemRequest(form=form.name, prompt=prompt, acrostic=acrostic, keywords=words,
                              tone=rng.random() < 0.8, rhyme=rng.random() < 0.8)
        try:
            request.validate()
        except RequestError as e:
            assert e.code == "bad_keywords" and "fit" in e.message
            continue
        plan = build_plan(vocab, prosody, request)
        for word in plan.keywords:
            tokens = [vocab.index[ch] for ch in word]
            assert any(all(plan.forced_at.get(p + k) == t for k, t in enumerate(tokens))
                       and p % (form.line_len + 1) + len(word) <= form.line_len for p in plan.forced_at), (request, word)
            placed += 1
    assert placed > 300


def test_a_single_keyword_never_splits_the_only_room_a_later_pair_needs(tiny):
    # Three free places in a row, line 4 of a 五绝, characters 2–4: 花 then 落日. Under s = 仄 the 2nd character
    # needs 仄, so 花's best place alone would be the 3rd, leaving no two neighbours for 落日.
    from engine.poem.constraints import _place_keywords, _tone_requirements, mask_tables
    from engine.poem.prosody import rhyme_book

    _, vocab, prosody = tiny
    form = FORMS["wujue"]
    free = {19, 20, 21}
    forced_at = {p: vocab.index["月"] for p in range(form.text_len) if p % 6 != 5 and p not in free}
    words = [[vocab.index["花"]], [vocab.index["落"], vocab.index["日"]]]
    eligible = mask_tables(prosody).eligible_groups(2)
    for req in (_tone_requirements(form, True), (_tone_requirements(form, True)[1],) * 2):  # s open, s = 仄
        placed, _, _ = _place_keywords(form.layout, prosody, rhyme_book(prosody, vocab, "pingshui"), words, forced_at,
                                       req, {10: 0, 22: 0}, (eligible,), 14)
        assert sorted(placed) == [19, 20, 21], placed


def test_a_keyword_the_prompt_already_holds_is_not_placed_again(tiny):
    _, vocab, prosody = tiny
    request = PoemRequest(form="wujue", prompt="白云明月山水花风清江天寒秋", keywords=["明月", "云", "秋"])
    plan = build_plan(vocab, prosody, request)
    assert len(plan.forced_at) == 13  # the prompt's characters only


def test_traditional_keywords_are_converted(tiny):
    result = write(tiny, form="wujue", mode="greedy", seed=2, keywords=["風", "孤舟"])
    assert holds(result, "风") and holds(result, "孤舟"), result.poem


# -- the engine: seeded, batch-invariant ------------------------------------------------------------------------


def same_poem(a, b) -> bool:
    return (a.poem, a.model, a.notes) == (b.poem, b.model, b.notes) and a.score == b.score


@pytest.mark.parametrize("mode", MODES)
async def test_a_seeded_request_with_keywords_gives_the_same_poem_alone_or_in_a_full_batch(checkpoint_store, mode):
    target = PoemRequest(prompt="山", form="qilv", mode=mode, beam_width=4, seed=7, keywords=["孤舟", "秋"])
    fillers = [PoemRequest(form="qilv", mode=m, beam_width=3, seed=i, keywords=[["雁"], [], ["明月", "寒"]][i % 3])
               for i, m in zip(range(40), itertools.cycle(MODES))]
    async with LocalEngine(engine_settings(checkpoint_store, max_num_rows=64)) as engine:
        alone = await engine.generate(target)
        crowd = [asyncio.ensure_future(engine.generate(r)) for r in fillers[:20]]
        await asyncio.sleep(0.05)  # the target joins a batch already running, at some row in the middle
        crowd.append(asyncio.ensure_future(engine.generate(target)))
        crowd += [asyncio.ensure_future(engine.generate(r)) for r in fillers[20:]]
        results = await asyncio.gather(*crowd)
    assert same_poem(alone, results[20])
    assert holds(alone, "孤舟") and holds(alone, "秋") and alone.poem.startswith("山")
    for request, result in zip(fillers[:20] + fillers[20:], results[:20] + results[21:]):
        assert all(holds(result, k) for k in request.keywords), (request.keywords, result.poem)


# -- validation: clear 400s that change nothing -----------------------------------------------------------------

BAD = [
    ({"keywords": ["舟", "秋", "山", "水", "花"]}, "at most 4"),
    ({"keywords": ["明月光"]}, "1 or 2"),
    ({"keywords": ["boat"]}, "not a Chinese character"),
    ({"keywords": ["舟", "🌙"]}, "not a Chinese character"),
    ({"keywords": [""]}, "1 or 2"),
    ({"keywords": [7]}, "string"),
    ({"form": "wujue", "prompt": "白云明月山水花风清江天寒秋雪", "keywords": ["孤舟", "落日", "归雁", "长空"]}, "fit"),
    ({"form": "wujue", "prompt": "白云明月山水花风清江天寒秋雪", "keywords": ["孤舟", "落日", "归雁"]}, "fit"),
]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_keywords_are_refused_by_validation_naming_the_field(body, message):
    with pytest.raises(RequestError) as info:
        PoemRequest.from_dict(body)
    assert (info.value.code, info.value.field) == ("bad_keywords", "keywords")
    assert message in info.value.message


def test_keywords_must_be_a_list():
    with pytest.raises(RequestError) as info:
        PoemRequest.from_dict({"keywords": "舟秋"})
    assert (info.value.code, info.value.field) == ("bad_type", "keywords")


def test_keywords_that_just_fit_are_accepted():
    # 6 places left: two 2-character keywords in line 4, two single ones in what remains.
    PoemRequest.from_dict({"form": "wujue", "prompt": "白云明月山水花风清江天寒秋雪", "keywords": ["孤舟", "落日", "雁", "长"]})
    PoemRequest.from_dict({"form": "wujue", "acrostic": "春山秋水", "keywords": ["孤舟", "落日", "归雁", "长空"]})


@pytest.fixture
async def client(aiohttp_client, checkpoint_store):
    return await aiohttp_client(create_app(ServiceSettings(engine=engine_settings(checkpoint_store), token=TOKEN)))


@pytest.mark.parametrize("body, message", BAD)
async def test_bad_keywords_are_a_400_with_a_clear_message_and_change_nothing(client, body, message):
    resp = await client.post("/v1/poems", json=body)
    assert resp.status == 400, await resp.text()
    error = (await resp.json())["error"]
    assert (error["code"], error["field"]) == ("bad_keywords", "keywords") and message in error["message"]
    status = await (await client.get("/v1/status")).json()
    assert status["requests"]["completed"] == 0 and status["queue_depth"] == 0


async def test_keywords_over_http_appear_in_the_poem(client):
    resp = await client.post("/v1/poems", json={"prompt": "月", "form": "qijue", "mode": "beam", "seed": 7,
                                                "keywords": ["舟", "秋"]})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["poem"].startswith("月") and all(any(k in line for line in body["lines"]) for k in "舟秋")


async def test_a_keyword_the_model_cannot_write_is_named(client):
    resp = await client.post("/v1/poems", json={"keywords": ["舟", "龘"]})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["code"], error["field"]) == ("unknown_character", "keywords") and "龘" in error["message"]


# -- the bot: /poem 月 舟 秋 ----------------------------------------------------------------------------------------


@pytest.fixture
def commands(tmp_path, store, scripted_engine, clock) -> Commands:  # noqa: F811
    return Commands(scripted_engine, store, make_settings(tmp_path), clock=clock)


def private(user_id: int = 42) -> Who:
    return Who(chat_id=user_id, user_id=user_id, chat_type="private")


@pytest.mark.parametrize("text", ["/poem 月 舟 秋", "月 舟 秋", "/poem  月   舟 秋 "])
async def test_the_first_word_opens_the_poem_and_the_rest_are_keywords(commands, scripted_engine, text):
    reply = await commands.handle(private(), text)
    assert reply.poem_id is not None
    request = scripted_engine.requests[-1]
    assert (request.prompt, request.keywords) == ("月", ["舟", "秋"])


@pytest.mark.parametrize("text, prompt", [("/poem 月落", "月落"), ("春", "春")])
async def test_a_single_word_still_only_opens_the_poem(commands, scripted_engine, text, prompt):
    await commands.handle(private(), text)
    assert (scripted_engine.requests[-1].prompt, scripted_engine.requests[-1].keywords) == (prompt, [])


async def test_bad_keywords_from_the_bot_get_a_clear_reply_and_no_poem(commands, scripted_engine):
    reply = await commands.handle(private(), "/poem 月 舟 秋 山 水 花")
    assert reply.poem_id is None and "at most 4" in reply.text and scripted_engine.requests == []


def test_the_poem_help_names_keywords():
    assert "关键词" in COMMANDS["poem"].usage and "keyword" in COMMANDS["poem"].en
    assert "/poem [开头 关键词…]" in help_text()
