"""Greedy, sampling and beam search on a tiny trained LSTM: always a valid poem, reproducible, and clear errors."""

from __future__ import annotations

import argparse
import random

import pytest
from conftest import DECODING_OPTIONS as OPTIONS, ACROSTIC
import torch

from engine import reference
from engine.sampling import choice
from engine.api import PoemRequest
from engine.errors import RequestError
from engine.model.checkpoint import load_checkpoint
from engine.poem.constraints import build_plan
from engine.reference import generate_one
from engine.sampling.choice import (Bias, beam_search_step, choose_beam, choose_greedy, choose_sample, greedy, logsumexp,
                                    make_generator, sample_batch, sample_sorted, step_bias, top_k)
from engine.sampling import kernels
from engine.poem.forms import FORM_NAMES, FORMS
from engine.poem.prosody import prosody_for
from engine.poem.judge import check_poem



@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    return ckpt.model, ckpt.vocab, prosody_for(ckpt.vocab)


def write(tiny, **fields):
    model, vocab, prosody = tiny
    return generate_one(model, vocab, prosody, PoemRequest(**fields))


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("form", FORM_NAMES)
@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_every_mode_form_and_option_yields_a_valid_poem(tiny, mode, form, option):
    fields = dict(OPTIONS[option], form=form, mode=mode, seed=1, beam_width=4)
    if fields.get("acrostic") is True:
        fields["acrostic"] = ACROSTIC[FORMS[form].num_lines]
    result = write(tiny, **fields)
    check = check_poem(result.poem, form, tiny[2])
    assert check.form_valid, result.poem
    assert check.lines == result.lines and result.form == form and result.mode == mode
    assert not check.repeated_chars and not check.repeated_line, result.poem
    if fields.get("rhyme", True):
        assert check.rhyme, result.poem
    if fields.get("tone", True) and not result.notes:
        assert check.tone_agreement == 1.0, result.poem
    if "prompt" in fields:
        assert "".join(result.lines).startswith(fields["prompt"])
    if "acrostic" in fields:
        assert "".join(line[0] for line in result.lines) == fields["acrostic"]
    assert result.score is not None and result.score < 0


@pytest.mark.parametrize("form", FORM_NAMES)
def test_sampling_with_the_same_seed_gives_the_same_poem(tiny, form):
    a = write(tiny, form=form, mode="sample", seed=42, prompt="月")
    b = write(tiny, form=form, mode="sample", seed=42, prompt="月")
    assert a.poem == b.poem and a.score == b.score


def test_sampling_with_different_seeds_gives_different_poems(tiny):
    poems = {write(tiny, form="qijue", mode="sample", seed=s, temperature=1.0, top_p=1.0).poem for s in range(6)}
    assert len(poems) > 1


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_greedy_and_beam_with_the_same_seed_repeat_exactly(tiny, mode):
    a, b = (write(tiny, form="wulv", mode=mode, prompt="月", seed=7) for _ in range(2))
    assert a.poem == b.poem and a.score == b.score


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_greedy_and_beam_vary_from_seed_to_seed(tiny, mode):
    # The likeliest poem is much the same whatever the prompt: both modes take a small seeded draw.
    poems = {write(tiny, form="qijue", mode=mode, prompt="月", seed=s).poem for s in range(6)}
    assert len(poems) > 1


def test_plain_beam_of_width_one_picks_what_greedy_picks(tiny):
    model, vocab, prosody = tiny
    rows = [build_plan(vocab, prosody, PoemRequest(form="qilv", prompt=p)).new_row() for p in "月山水花风云"]
    logits = torch.randn(len(rows), len(vocab), generator=torch.Generator().manual_seed(0))
    bias = step_bias(rows, 1.0, "cpu")
    step, _ = choose_beam(logits, bias, torch.zeros(len(rows)), 1)
    assert torch.equal(step.tokens, choose_greedy(logits, bias))


def test_beam_search_finds_a_poem_at_least_as_likely_as_greedy_on_average(tiny):
    # Not guaranteed poem by poem (pruning, penalties), but over several openings a width-8 beam wins.
    diffs = [write(tiny, form="wujue", mode="beam", beam_width=8, prompt=p).score
             - write(tiny, form="wujue", mode="greedy", prompt=p).score for p in "月山水花风云"]
    assert sum(diffs) > 0


@pytest.mark.parametrize("fields, code", [
    ({"prompt": "😀"}, "bad_character"),
    ({"prompt": "moon"}, "bad_character"),
    ({"prompt": "犇"}, "unknown_character"),
    ({"prompt": "明" * 15}, "prompt_too_long"),
    ({"form": "wujue", "acrostic": "春山"}, "bad_acrostic"),
    ({"form": "qilv", "acrostic": "春山秋水"}, "bad_acrostic"),
    ({"mode": "nucleus"}, "bad_mode"),
    ({"mode": "beam", "beam_width": 17}, "out_of_range"),
    ({"temperature": 0}, "out_of_range"),
])
def test_bad_input_gives_its_error(tiny, fields, code):
    with pytest.raises(RequestError) as e:
        write(tiny, **fields)
    assert e.value.code == code


def test_traditional_prompt_is_accepted(tiny):
    result = write(tiny, form="qijue", mode="greedy", prompt="東風")
    assert result.lines[0].startswith("东风")


def test_relaxed_rules_are_reported_in_the_result(tiny):
    result = write(tiny, form="wujue", mode="greedy", acrostic="月月月山")
    assert any("「月」" in n for n in result.notes)


# --- primitives -------------------------------------------------------------------------------------


def test_greedy_takes_the_largest_logit_per_row():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 2.0]])
    assert greedy(logits).tolist() == [1, 0]


def kernel_sample_batch(logits, temperature, top_k, top_p, uniform):
    """sample_batch's signature on the C kernel: scores = logits (a zero bias)."""
    assert kernels.AVAILABLE, "engine._kernels is not built: `pip install -e .` needs a C compiler"
    logits = logits.float().contiguous()
    return kernels.sample(logits, Bias.of_dense(torch.zeros_like(logits)), torch.arange(logits.shape[0]),
                          temperature.float().clamp_min(choice.MIN_TEMPERATURE), top_k, top_p, uniform)


SAMPLERS = {"torch": sample_batch, "kernel": kernel_sample_batch, "sorted": sample_sorted}


def draw(sampler, logits_row, temperature, top_k, top_p, generator) -> int:
    """One draw from one row, with the generator's next uniform number (as the engine draws it)."""
    u = float(torch.rand((), generator=generator))
    one = lambda v, dtype=torch.float32: torch.tensor([v], dtype=dtype)  # noqa: E731
    return int(SAMPLERS[sampler](logits_row[None], one(temperature), one(top_k, torch.long), one(top_p), one(u))[0])


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_never_picks_a_masked_token(sampler):
    logits = torch.tensor([0.0, float("-inf"), 0.0, float("-inf")])
    g = make_generator(0)
    assert {draw(sampler, logits, 1.0, 0, 1.0, g) for _ in range(200)} == {0, 2}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (0, 1e-6), (0, 5e-324)])  # 5e-324 is 0 in float32
def test_sampling_with_top_k_1_or_tiny_top_p_is_greedy(sampler, top_k, top_p):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    g = make_generator(1)
    assert all(draw(sampler, logits, 1.0, top_k, top_p, g) == int(logits.argmax()) for _ in range(20))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_top_k_keeps_only_the_k_best_tokens(sampler):
    logits = torch.arange(10.0)
    g = make_generator(3)
    assert {draw(sampler, logits, 2.0, 3, 1.0, g) for _ in range(300)} == {7, 8, 9}


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_follows_the_distribution(sampler):
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    g = make_generator(5)
    draws = [draw(sampler, logits, 1.0, 0, 1.0, g) for _ in range(3000)]
    assert abs(draws.count(0) / 3000 - 0.7) < 0.04 and abs(draws.count(2) / 3000 - 0.1) < 0.03


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_batched_sampling_equals_row_by_row_sampling(sampler):
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    temperature = torch.tensor([0.5, 1.0, 1.5, 0.8, 1.0, 2.0])
    top_k = torch.tensor([0, 5, 0, 3, 0, 10])
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.3, 0.95])
    gens = [make_generator(s) for s in range(6)]
    uniform = torch.tensor([torch.rand((), generator=make_generator(s)).item() for s in range(6)])
    batch = SAMPLERS[sampler](logits, temperature, top_k, top_p, uniform)
    single = [draw(sampler, logits[i], float(temperature[i]), int(top_k[i]), float(top_p[i]), gens[i]) for i in range(6)]
    assert batch.tolist() == single


def kept_distribution(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """The exact law of a draw, brute force in float64: the nucleus (and top-k) renormalised."""
    probs = torch.softmax(logits.double(), dim=-1)
    ordered, _ = probs.sort(descending=True)
    boundary = ordered[min(int((ordered.cumsum(0) < top_p).sum()), int((ordered > 0).sum()) - 1)]
    kept = probs >= boundary
    if top_k:
        kept &= probs >= ordered[top_k - 1]
    law = torch.where(kept, probs, 0.0)
    return law / law.sum()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_keeps_exactly_the_nucleus_and_the_top_k(sampler):
    # Against a brute-force nucleus in float64 over flat, peaked and masked rows, narrow and as wide as the
    # model's vocabulary: every draw is in the kept set, and with enough draws every kept token turns up.
    gen = torch.Generator().manual_seed(0)
    for scale, top_p, top_k, V in [(0.5, 0.9, 0, 300), (3.0, 0.9, 0, 300), (8.0, 0.5, 0, 300), (1.0, 1.0, 0, 300),
                                   (2.0, 0.95, 7, 300), (0.3, 0.9, 0, 6000), (3.0, 0.7, 0, 6000), (1.0, 1.0, 40, 6000)]:
        logits = torch.randn(V, generator=gen) * scale
        logits[::3] = float("-inf")
        kept = kept_distribution(logits, top_p, top_k) > 0
        n = 4000
        draws = SAMPLERS[sampler](logits.expand(n, -1), torch.ones(n), torch.full((n,), top_k),
                                  torch.full((n,), top_p), torch.rand(n, generator=gen))
        assert kept[draws].all(), (scale, top_p, top_k, V)
        if int(kept.sum()) <= 20:
            assert set(draws.tolist()) == set(kept.nonzero().flatten().tolist())


def test_the_sorting_sampler_draws_what_the_histogram_sampler_draws():
    # The GPU's sampler (no data-dependent shapes) against sample_batch on the same rows and uniforms: the
    # same rule, the running mass summed in another order, so only a boundary within rounding may differ.
    gen = torch.Generator().manual_seed(3)
    N, V = 512, 3000
    x = torch.randn(N, V, generator=gen) * torch.rand(N, 1, generator=gen) * 6
    x[torch.rand(N, V, generator=gen) < torch.rand(N, 1, generator=gen)] = float("-inf")
    x[torch.arange(N), torch.randint(V, (N,), generator=gen)] = 1.0  # every row keeps a token
    args = (torch.rand(N, generator=gen) * 1.5 + 0.05,
            torch.where(torch.rand(N, generator=gen) < 0.5, torch.randint(1, 20, (N,), generator=gen), 0),
            torch.rand(N, generator=gen) * 0.99 + 0.01, torch.rand(N, generator=gen))
    same = (sample_sorted(x, *args) == sample_batch(x, *args)).float().mean()
    assert same >= 0.99


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_draws_the_last_kept_token_when_the_uniform_rounds_up(sampler):
    logits = torch.tensor([[0.0, 0.0, float("-inf"), 0.0, float("-inf")]])
    one = lambda v, dtype=torch.float32: torch.tensor([v], dtype=dtype)  # noqa: E731
    sample = SAMPLERS[sampler]
    assert int(sample(logits, one(1.0), one(0, torch.long), one(1.0), one(1.0 - 2**-24))[0]) == 3
    assert int(sample(logits, one(1.0), one(0, torch.long), one(1.0), one(0.0))[0]) == 0


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("top_p, top_k", [(0.9, 0), (0.3, 0), (1.0, 5), (0.05, 0)])
def test_sampling_draws_each_kept_token_in_proportion_to_its_probability(sampler, top_p, top_k):
    # Empirical frequencies over many uniforms against the exact law: total variation within sampling noise.
    # top_p 0.05 over a long flat tail makes the kernel's rejection rounds many.
    gen = torch.Generator().manual_seed(int(top_p * 100) + top_k)
    logits = torch.linspace(0.0, -3.0, 400) if top_p == 0.05 else torch.randn(400, generator=gen) * 1.5
    logits[1::4] = float("-inf")
    n = 40_000
    draws = SAMPLERS[sampler](logits.expand(n, -1).contiguous(), torch.ones(n), torch.full((n,), top_k),
                              torch.full((n,), top_p), torch.rand(n, generator=gen))
    law = kept_distribution(logits, top_p, top_k)
    seen = torch.bincount(draws, minlength=400).double() / n
    assert (law[draws] > 0).all()
    assert 0.5 * (seen - law).abs().sum() < 0.03


def sparse_like(dense: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> Bias:
    """`dense` as rows of `table` plus the entries where it differs from them."""
    edits = [(dense[r] != table[index[r]]).nonzero().flatten() for r in range(dense.shape[0])]
    ptr = torch.tensor([0] + [len(e) for e in edits]).cumsum(0)
    tokens = torch.cat(edits)
    rows = torch.repeat_interleave(torch.arange(dense.shape[0]), ptr.diff())
    return Bias(table, index, ptr, tokens, dense[rows, tokens])


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_the_choice_on_kernels_equals_the_torch_primitives(rows):
    # choose_* take the C kernels on a CPU; the torch primitives on the same scores pick the same tokens.
    assert kernels.AVAILABLE, "engine._kernels is not built: `pip install -e .` needs a C compiler"
    gen = torch.Generator().manual_seed(rows)
    V, width = 6000, 5
    logits = torch.randn(rows * width, V, generator=gen) * 3
    table = torch.zeros(2, V)
    table[0, ::3] = float("-inf")  # a mask row, and a row that allows nothing (forced rows start from it)
    table[1] = float("-inf")
    index = torch.zeros(rows * width, dtype=torch.long)
    index[0] = 1
    dense = table[index]
    dense[:, 1::11] -= 1.0  # penalties: -1 where allowed, still -inf where masked
    dense[0, 7] = 0.0  # a forced row: one allowed token
    dense[-1, 2::13] = float("-inf")  # bans
    for bias in (sparse_like(dense, table, index), Bias.of_dense(dense)):  # in place of the dense rows, and as them
        assert torch.equal(bias.dense(), dense)
        lse = logsumexp(logits)
        assert torch.allclose(lse, torch.logsumexp(logits, dim=-1), atol=1e-5, rtol=1e-6)
        assert torch.equal(choose_greedy(logits, bias), (dense + logits).argmax(dim=-1))
        scores = torch.randn(rows * width, generator=gen)
        scores[width - 1::width] = float("-inf")  # an empty slot per request
        (step, beam_lse), ref = choose_beam(logits, bias, scores, width), beam_search_step(
            (dense + scores[:, None]) + (logits - lse[:, None]), width)
        assert torch.equal(beam_lse, lse)
        assert torch.equal(step.scores, ref.scores)
        assert torch.equal(step.parents, ref.parents) and torch.equal(step.tokens, ref.tokens)
        # The stochastic beam: the kernels' best 3·width candidates are the torch path's, noise and all.
        uniform = torch.rand(rows, 3 * width, generator=gen)
        noisy = choose_beam(logits, bias, scores, width, uniform)[0]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernels, "AVAILABLE", False)
            noisy_ref = choose_beam(logits, bias, scores, width, uniform)[0]
        assert torch.equal(noisy.parents, noisy_ref.parents) and torch.equal(noisy.tokens, noisy_ref.tokens)
        assert torch.allclose(noisy.scores, noisy_ref.scores, rtol=1e-6, atol=1e-5)
        pick = torch.arange(0, rows * width, 2)
        u = torch.rand(len(pick), generator=gen)
        ones = torch.ones(len(pick))
        drawn = choose_sample(logits, bias, pick, ones, torch.zeros(len(pick), dtype=torch.long), ones * 0.9, u)
        assert torch.isfinite(dense[pick, drawn]).all()
        assert drawn[0] == 7  # the forced row
        half = rows * width // 2 // width * width  # a group boundary
        assert torch.equal(bias.rows(half, rows * width).dense(), dense[half:])


@pytest.mark.parametrize("broken", ["index", "token", "ptr", "table"])
def test_the_kernels_refuse_a_bias_that_does_not_fit_their_rows(broken):
    V = 50
    logits = torch.randn(4, V)
    bias = Bias(torch.zeros(2, V), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 1, 2, 2]), torch.tensor([3, 4]),
                torch.tensor([-1.0, -2.0]))
    kernels.greedy(logits, bias)  # fits
    if broken == "index":
        bias.index = torch.tensor([0, 2, 0, 1])  # the table has 2 rows
    elif broken == "token":
        bias.tokens = torch.tensor([3, V])
    elif broken == "ptr":
        bias.ptr = torch.tensor([0, 2, 1, 2, 2])
    else:
        bias.table = torch.zeros(2 * V + 1)
    with pytest.raises(ValueError, match="bias"):
        kernels.greedy(logits, bias)
    with pytest.raises(ValueError, match="bias"):
        kernels.beam(logits, bias, torch.zeros(4), 2)
    with pytest.raises(ValueError, match="bias"):
        kernels.sample(logits, bias, torch.arange(4), torch.ones(4), torch.zeros(4, dtype=torch.long), torch.ones(4),
                       torch.rand(4))


def test_beam_search_step_ranks_cumulative_scores_and_names_parents():
    scores = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]))
    step = beam_search_step(torch.tensor([[0.0], [-1.0]]) + scores, width=2)
    # candidates: (0,0) -0.51, (0,1) -1.20, (1,2) -1.22, ...
    assert step.parents.tolist() == [0, 0] and step.tokens.tolist() == [0, 1]
    assert step.scores[0] >= step.scores[1]


def test_beam_search_step_keeps_requests_apart_and_equal_to_their_solo_steps():
    gen = torch.Generator().manual_seed(1)
    totals = torch.log_softmax(torch.randn(12, 6000, generator=gen), dim=-1) + torch.randn(12, 1, generator=gen)
    together = beam_search_step(totals, width=4)  # 3 requests × width 4
    for g in range(3):
        rows = slice(4 * g, 4 * g + 4)
        alone = beam_search_step(totals[rows].clone(), width=4)
        assert together.parents[rows].tolist() == [p + 4 * g for p in alone.parents.tolist()]
        assert torch.equal(together.tokens[rows], alone.tokens) and torch.equal(together.scores[rows], alone.scores)
        best = totals[rows].flatten().topk(4)
        assert torch.equal(alone.scores, best.values)


def test_beam_search_step_fills_empty_slots_with_dead_copies_of_the_best_beam():
    totals = torch.full((3, 5), float("-inf"))
    totals[0, 2] = -0.5  # a forced step from one live beam: one finite candidate
    step = beam_search_step(totals, width=3)
    assert step.parents.tolist() == [0, 0, 0] and step.tokens.tolist() == [2, 2, 2]
    assert torch.isfinite(step.scores[0]) and torch.isinf(step.scores[1:]).all()


@pytest.mark.parametrize("n", [6000, 6009, 256, 37])  # with and without a block size dividing the row
def test_greedy_and_top_k_by_block_maxima_equal_argmax_and_topk(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(40, n, generator=gen)
    x[:, ::7] = float("-inf")
    x[3, :] = float("-inf")
    x[3, n // 2] = 0.0
    x[5, 10] = x[5, 2000 % n] = x[5].max() + 1  # a tie: the first one wins, as argmax
    assert torch.equal(greedy(x), x.argmax(dim=-1))
    for k in (1, 5, 16):
        values, idx = top_k(x, k)
        ref = x.topk(k, dim=-1)
        assert torch.equal(values, ref.values) and torch.equal(x.gather(1, idx), values)


def test_step_bias_masks_and_subtracts_the_penalty_per_earlier_use(tiny):
    _, vocab, prosody = tiny
    plan = build_plan(vocab, prosody, PoemRequest(form="wujue", prompt="月月山"))
    row = plan.new_row()
    for _ in range(3):
        row.advance(row.forced())
    bias = step_bias([row], 0.5, "cpu").dense()[0]
    allowed = torch.isfinite(bias)
    assert not allowed[vocab.index["月"]]  # a third 月 is banned
    assert bias[vocab.index["山"]] == -0.5  # one earlier use
    assert (bias[allowed] == 0).sum() == allowed.sum() - 1
    assert torch.equal(torch.isfinite(step_bias([row], 0.0, "cpu").dense()[0]), allowed)
    assert (step_bias([row], 0.0, "cpu").dense()[0][allowed] == 0).all()


def test_step_bias_is_the_dense_recipe_bit_for_bit(tiny):
    # The sparse bias against the dense recipe it replaces (gather the mask rows, 0 at a forced token, -inf at
    # the banned ones, then subtract each earlier use's penalty in place), over rows in every state: forced,
    # free, with bans and repeated characters, finished; penalties per row, zero for some.
    def allowed_bias(rows):
        tables = rows[0].plan.tables
        bias = tables.bias_on("cpu")[torch.tensor([r.mask_index for r in rows])]  # (N, V)
        for i, r in enumerate(rows):
            if r.forced() is not None:
                bias[i, r.forced()] = 0.0
            else:
                bias[i, list(r.step_banned)] = float("-inf")
        return bias

    _, vocab, prosody = tiny
    rng = random.Random(3)
    rows = []
    for prompt, form in (("月月山", "wujue"), ("春风", "qijue"), ("", "wujue"), ("山山", "wulv")):
        plan = build_plan(vocab, prosody, PoemRequest(form=form, prompt=prompt))
        row = plan.new_row()
        for step in range(plan.num_steps):
            if step % 3 == 0:
                rows.append(row.copy())
            if row.done:
                break
            allowed = torch.isfinite(step_bias([row], 0.0, "cpu").dense()[0]).nonzero().flatten().tolist()
            row.advance(row.forced() if row.forced() is not None else rng.choice(allowed))
    rows = [r for r in rows if not r.done]
    penalties = [rng.choice([0.0, 1.0, 0.37]) for _ in rows]
    uses = choice._uses(rows, penalties)
    want = allowed_bias(rows)
    want.index_put_((uses[0], uses[1]), -uses[2], accumulate=True)
    got = step_bias(rows, penalties, "cpu")
    assert len(rows) > 10 and got.tokens.numel() > len(rows)
    assert torch.equal(got.dense(), want)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_every_mode_pays_the_repetition_penalty(tiny_checkpoint, mode):
    """A batch's rows of every mode pay REPEAT_PENALTY per earlier use (sampled poems too: they repeated
    characters far more often than poets do)."""
    from engine.serving.registry import build_serving
    from engine.serving.runner import ModelBatch
    from engine.serving.scheduler import EngineRequest

    serving = build_serving("lstm", tiny_checkpoint, torch.device("cpu"))
    request = PoemRequest(form="wujue", mode=mode, prompt="山").validate()
    batch = ModelBatch(serving)
    batch.add(EngineRequest("r", request, request.beam_width if mode == "beam" else 1, 0.0), serving.make_plan(request))
    assert batch.groups[0].penalty == choice.REPEAT_PENALTY > 0


# --- CLI --------------------------------------------------------------------------------------------


def run_cli(argv, capsys):
    parser = argparse.ArgumentParser()
    reference.add_arguments(parser)
    code = reference.main(parser.parse_args(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_cli_prints_the_poem_one_line_each(tiny_checkpoint, capsys):
    code, out, err = run_cli(["月", "--form", "qijue", "--mode", "beam", "--beam-width", "5", "--seed", "7",
                              "--checkpoint", str(tiny_checkpoint)], capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4 and lines[0].startswith("月")
    assert check_poem("".join(lines), "qijue").form_valid


@pytest.mark.parametrize("argv, named", [
    (["月😀"], "😀"),
    (["犇"], "犇"),
    (["--form", "sonnet"], "sonnet"),
    (["--mode", "beam", "--beam-width", "40"], "beam_width"),
])
def test_generate_cli_reports_bad_input_in_one_line_and_exits_2(tiny_checkpoint, capsys, argv, named):
    code, out, err = run_cli([*argv, "--checkpoint", str(tiny_checkpoint)], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and named in err


def test_generate_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    code, out, err = run_cli(["月", "--checkpoint", str(tmp_path / "nope.safetensors")], capsys)
    assert code == 2 and "nope.safetensors" in err and len(err.strip().splitlines()) == 1
