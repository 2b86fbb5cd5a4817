"""engine.model.contrastive: the pair's scores, its stacked state, and poems decoded with it."""

import asyncio
import math

import pytest
import torch

from engine.api import PoemRequest
from engine.model.checkpoint import load_checkpoint
from engine.model.contrastive import OUTSIDE, ContrastivePair
from engine.model.network import ModelConfig, PoemModel, compile_step
from engine.poem.forms import FORMS, FORM_NAMES
from engine.poem.judge import check_poem
from engine.poem.prosody import prosody_for
from engine.reference import generate_one


def tiny(cell: str, seed: int, **overrides) -> PoemModel:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=30, cell=cell, embed_dim=8, hidden_dim=12, num_layers=2) | overrides
    return PoemModel(ModelConfig(**cfg)).eval()


@pytest.fixture
def pair():
    # The amateur is shallower and of another cell: the stacked state pads its layers.
    expert = tiny("lstm", 0)
    with torch.no_grad():
        expert.head.weight.mul_(30)  # peaked, as a trained model's: some characters fall outside the plausible
    return ContrastivePair(expert, tiny("gru", 1, num_layers=1, hidden_dim=7), alpha=0.5, beta=0.2)


@torch.no_grad()
def test_plausible_characters_are_scored_against_the_amateur_and_the_rest_keep_the_experts_order(pair):
    tokens = torch.randint(0, 30, (4,))
    scores, _ = pair.step(tokens, pair.init_state(4))
    logp_e = torch.log_softmax(pair.expert.step(tokens, pair.expert.init_state(4))[0], -1)
    logp_a = torch.log_softmax(pair.amateur.step(tokens, pair.amateur.init_state(4))[0], -1)
    plausible = logp_e >= logp_e.amax(-1, keepdim=True) + math.log(0.2)
    assert plausible.sum(1).min() >= 1 and (~plausible).sum(1).min() >= 1
    torch.testing.assert_close(scores[plausible], (logp_e - 0.5 * logp_a)[plausible])
    torch.testing.assert_close(scores[~plausible], (logp_e - OUTSIDE)[~plausible])
    for row in range(4):  # every plausible character above every other
        assert scores[row][plausible[row]].min() > scores[row][~plausible[row]].max()


@torch.no_grad()
def test_the_stacked_state_carries_each_models_own_state(pair):
    tokens = torch.randint(0, 30, (3, 6))
    state = pair.init_state(3)
    state_e, state_a = pair.expert.init_state(3), pair.amateur.init_state(3)
    for t in range(6):
        scores, state = pair.step(tokens[:, t], state)
        _, state_e = pair.expert.step(tokens[:, t], state_e)
        _, state_a = pair.amateur.step(tokens[:, t], state_a)
    e = pair.expert.config
    torch.testing.assert_close(state[:, :, :e.state_dim], state_e)
    torch.testing.assert_close(state[:1, :, e.state_dim:], state_a)
    assert not state[1:, :, e.state_dim:].any()  # the amateur's missing layer stays padding
    whole, last = pair(tokens)
    torch.testing.assert_close(whole[:, -1], scores)
    torch.testing.assert_close(last, state)


@torch.no_grad()
def test_rows_are_independent_and_the_traced_step_is_the_eager_one(pair):
    tokens, state = torch.randint(0, 30, (5,)), torch.randn(2, 5, pair.config.state_dim) * 0.1
    scores, new = pair.step(tokens, state)
    for row in range(5):
        alone, alone_state = pair.step(tokens[row:row + 1], state[:, row:row + 1])
        torch.testing.assert_close(alone[0], scores[row])
        torch.testing.assert_close(alone_state[:, 0], new[:, row])
    traced = compile_step(pair)
    assert traced is not pair.step
    torch.testing.assert_close(traced(tokens, state)[0], scores)


@pytest.mark.parametrize("change,problem", [
    (dict(amateur=tiny("gru", 1, vocab_size=31)), "vocabulary"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=1.5), "alpha"),
    (dict(beta=1.0), "beta"),
])
def test_a_pair_that_cannot_work_is_refused(change, problem):
    args = dict(expert=tiny("lstm", 0), amateur=tiny("gru", 1), alpha=0.3) | change
    with pytest.raises(ValueError, match=problem):
        ContrastivePair(**args)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_poems_decoded_with_a_pair_keep_every_rule(tiny_checkpoint, tiny_gru_checkpoint, mode):
    expert, amateur = load_checkpoint(tiny_checkpoint), load_checkpoint(tiny_gru_checkpoint)
    assert expert.vocab.tokens == amateur.vocab.tokens
    pair = ContrastivePair(expert.model, amateur.model, alpha=0.3)
    prosody = prosody_for(expert.vocab)
    differs = 0
    for i, form in enumerate(FORM_NAMES):
        request = PoemRequest(form=form, mode=mode, seed=i, prompt="月").validate()
        result = generate_one(pair, expert.vocab, prosody, request)
        verdict = check_poem(result.poem, FORMS[form], prosody)
        assert verdict.ok, (result.poem, verdict)
        assert generate_one(pair, expert.vocab, prosody, request).poem == result.poem  # the seed decides
        differs += result.poem != generate_one(expert.model, expert.vocab, prosody, request).poem
    assert differs >= 2  # the amateur changes what is written


# -- in the engine: ENGINE_CONTRAST ---------------------------------------------------------------------------------

from engine.model import versions as store  # noqa: E402
from engine.serving.local import EngineSettings, LocalEngine  # noqa: E402
from engine_fixtures import checkpoint_store, engine_settings  # noqa: E402,F401
from test_hotswap import new_version  # noqa: E402


@pytest.mark.parametrize("row_state", ["host", "device"])
async def test_the_engine_decodes_against_the_contrast_model_as_the_reference_decoder_does(checkpoint_store, row_state):
    requests = [PoemRequest(form=form, mode=mode, seed=i, prompt="月", beam_width=3).validate()
                for i, (form, mode) in enumerate((f, m) for f in FORM_NAMES for m in ("greedy", "sample", "beam"))]
    async with LocalEngine(engine_settings(checkpoint_store, contrast="gru", row_state=row_state)) as engine:
        results = await asyncio.gather(*(engine.generate(r) for r in requests))
        models = {m["name"]: m for m in await engine.models()}
        lstm = engine.registry.get("lstm")
    assert models["lstm"]["contrast"] == {"amateur": "gru", "version": models["gru"]["version"], "alpha": 0.3}
    assert models["gru"]["contrast"] is None  # the contrast model decodes by itself
    assert isinstance(lstm.model, ContrastivePair)
    for request, result in zip(requests, results):
        alone = generate_one(lstm.model, lstm.vocab, lstm.prosody, request)  # batched, or alone: one poem
        assert result.poem == alone.poem, request


async def test_a_new_version_of_the_contrast_model_pairs_again_and_a_new_expert_is_paired(checkpoint_store, tiny_checkpoint,
                                                                                       tiny_gru_checkpoint, tmp_path):
    async with LocalEngine(engine_settings(checkpoint_store, contrast="gru", contrast_alpha=0.5)) as engine:
        before = {m["name"]: m for m in await engine.models()}
        gru = store.publish(checkpoint_store, "gru", new_version(tiny_gru_checkpoint, tmp_path / "g2.safetensors"))
        report = await engine.reload()
        await engine.generate(PoemRequest(form="wujue", seed=1))  # a step applies what was staged
        after = {m["name"]: m for m in await engine.models()}
        lstm = store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "l2.safetensors"))
        await engine.reload("lstm")
        await engine.generate(PoemRequest(form="wujue", seed=1))
        last = {m["name"]: m for m in await engine.models()}
    assert report["gru"]["status"] == "swapped" and report["lstm"]["status"] == "unchanged"
    assert after["lstm"]["version"] == before["lstm"]["version"]
    assert after["lstm"]["contrast"] == {"amateur": "gru", "version": gru, "alpha": 0.5}
    assert last["lstm"]["version"] == lstm and last["lstm"]["contrast"]["version"] == gru


async def test_a_pair_that_fails_its_smoke_test_leaves_the_model_serving_alone(checkpoint_store, monkeypatch, caplog):
    from engine.serving import registry

    real = registry.smoke_test

    def refuse_pairs(serving):
        if serving.contrast is not None:
            raise registry.ValidationError("smoke generation of wujue gave '…', not a wujue")
        real(serving)

    monkeypatch.setattr(registry, "smoke_test", refuse_pairs)
    async with LocalEngine(engine_settings(checkpoint_store, contrast="gru")) as engine:
        result = await engine.generate(PoemRequest(form="wujue", seed=1))
        models = {m["name"]: m for m in await engine.models()}
    assert result.form == "wujue" and models["lstm"]["contrast"] is None
    assert "failed its smoke test" in caplog.text


def test_a_contrast_model_of_another_vocabulary_is_not_paired(tiny_checkpoint, tiny_gru_checkpoint):
    from dataclasses import replace

    from engine.poem.vocab import Vocab
    from engine.serving.registry import build_serving, pair_with

    lstm = build_serving("lstm", tiny_checkpoint, torch.device("cpu"))
    gru = build_serving("gru", tiny_gru_checkpoint, torch.device("cpu"))
    tokens = gru.vocab.tokens
    other = replace(gru, vocab=Vocab(tokens[:-2] + tokens[-1:] + tokens[-2:-1]))  # two characters swapped
    assert pair_with(lstm, other, 0.3) is lstm
    paired = pair_with(lstm, gru, 0.3)
    assert isinstance(paired.model, ContrastivePair) and pair_with(paired, None, 0.3).model is lstm.model


@pytest.mark.parametrize("env,problem", [
    ({"ENGINE_CONTRAST": "gpt"}, "ENGINE_CONTRAST"),
    ({"ENGINE_CONTRAST": "gru", "ENGINE_MODELS": "lstm"}, "ENGINE_CONTRAST"),
    ({"ENGINE_CONTRAST_ALPHA": "0"}, "ENGINE_CONTRAST_ALPHA"),
    ({"ENGINE_CONTRAST_ALPHA": "1.5"}, "ENGINE_CONTRAST_ALPHA"),
    ({"ENGINE_CONTRAST_ALPHA": "nan"}, "ENGINE_CONTRAST_ALPHA"),
    ({"ENGINE_CONTRAST_ALPHA": "much"}, "ENGINE_CONTRAST_ALPHA"),
])
def test_a_bad_contrast_setting_is_refused(env, problem):
    with pytest.raises(ValueError, match=problem):
        EngineSettings.from_env(env)


def test_contrast_is_on_by_default_where_the_contrast_model_is_served_and_off_on_request():
    assert EngineSettings.from_env({}).contrast_model == "gru"
    assert EngineSettings.from_env({"ENGINE_MODELS": "lstm-large,lstm"}).contrast_model is None  # auto: not served
    assert EngineSettings.from_env({"ENGINE_CONTRAST": "off"}).contrast_model is None
    assert EngineSettings.from_env({"ENGINE_CONTRAST": "lstm", "ENGINE_CONTRAST_ALPHA": "0.5"}).contrast_alpha == 0.5
