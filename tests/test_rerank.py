"""Reranking beam search's final beams by a right-to-left model: training it, scoring with it, and serving it."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from conftest import train_tiny
from engine_fixtures import checkpoint_store, empty_package_dir, engine_settings  # noqa: F401

from engine.api import PoemRequest
from engine.model import versions as store
from engine.model.checkpoint import load_checkpoint, read_meta
from engine.poem.constraints import build_plan
from engine.poem.prosody import prosody_for
from engine.reference import _beam, generate_one
from engine.sampling.formulas import formulas_for
from engine.sampling.rerank import backward_logprobs, best_candidate
from engine.serving.local import EngineSettings, LocalEngine
from engine.serving.registry import ModelRegistry
from trainer.data import Buckets, reversed_row
from trainer.evaluate import perplexity_of_rows


@pytest.fixture(scope="session")
def tiny_rtl_checkpoint(tiny_corpus, tiny_checkpoint, tmp_path_factory):
    """The tiny LSTM's right-to-left companion: its vocabulary, trained on the texts read backwards."""
    return train_tiny(tiny_corpus, tmp_path_factory.mktemp("rtl"), "lstm", reverse=True,
                      init_from=str(tiny_checkpoint))


@pytest.fixture
def paired_store(checkpoint_store, tiny_rtl_checkpoint):
    store.publish(checkpoint_store, "lstm-rtl", tiny_rtl_checkpoint)
    return checkpoint_store


def beam_requests(n: int, width: int = 5) -> list[PoemRequest]:
    forms = ("wujue", "qijue", "wulv", "qilv")
    return [PoemRequest(prompt="月" if i % 2 else "", form=forms[i % 4], mode="beam", beam_width=width,
                        seed=100 + i).validate() for i in range(n)]


# -- training ------------------------------------------------------------------------------------------------
def test_a_reversed_bucket_reads_each_text_backwards_between_its_start_and_end_tokens():
    rows = [[1, 10, 11, 12, 2], [1, 20, 21, 22, 2]]
    assert Buckets({"x": torch.tensor(rows)}).reversed().tensors["x"].tolist() == [reversed_row(r) for r in rows]
    assert reversed_row([1, 10, 11, 12, 2]) == [1, 12, 11, 10, 2]


def test_a_reverse_run_writes_a_checkpoint_marked_right_to_left(tiny_rtl_checkpoint, tiny_checkpoint):
    assert read_meta(tiny_rtl_checkpoint)["direction"] == "rtl"
    assert read_meta(tiny_checkpoint)["direction"] == "ltr"
    assert read_meta(tiny_rtl_checkpoint)["vocab"] == read_meta(tiny_checkpoint)["vocab"]


def test_a_run_cannot_resume_in_the_other_direction(tiny_corpus, tmp_path):
    train_tiny(tiny_corpus, tmp_path, "lstm", steps=3)
    from trainer.train import TrainConfig, Trainer

    cfg = TrainConfig(corpus=[str(tiny_corpus)], out=str(tmp_path), embed_dim=16, hidden_dim=32, num_layers=1,
                      dropout=0.0, min_count=1, reverse=True)
    with pytest.raises(ValueError, match="reverse"):
        Trainer(cfg, resume=True, log=lambda m: None)


# -- scoring --------------------------------------------------------------------------------------------------
def test_backward_logprobs_are_the_texts_log_likelihood_read_right_to_left(tiny_rtl_checkpoint):
    ckpt = load_checkpoint(tiny_rtl_checkpoint)
    vocab = ckpt.vocab
    han = vocab.han_ids()[:20]
    lines = [han[i : i + 5] for i in range(0, 20, 5)]
    marks = [vocab.comma_id, vocab.period_id] * 2
    texts = [[t for line, m in zip(lines, marks) for t in (*line, m)],
             [t for line, m in zip(lines[::-1], marks) for t in (*line, m)]]
    start = vocab.form_id("wujue")
    scores = backward_logprobs(ckpt.model, start, vocab.eos_id, texts)
    for text, score in zip(texts, scores):
        ref = perplexity_of_rows(ckpt.model, vocab, [reversed_row([start, *text, vocab.eos_id])])
        assert score == pytest.approx(-ref["nll"] * ref["chars"], rel=1e-4)
    assert scores[0] != scores[1]


def test_the_best_candidate_maximises_forward_plus_weighted_backward_and_keeps_beam_order_on_ties():
    assert best_candidate([-10.0, -11.0, -12.0], [-30.0, -20.0, -29.0]) == 1
    assert best_candidate([-10.0, -11.0], [-30.0, -20.0], weight=0.0) == 0
    assert best_candidate([-10.0, -10.0], [-5.0, -5.0]) == 0


def test_the_reference_decoder_returns_the_final_beam_both_directions_like_best(tiny_checkpoint, tiny_rtl_checkpoint):
    fwd, rtl = load_checkpoint(tiny_checkpoint), load_checkpoint(tiny_rtl_checkpoint)
    prosody = prosody_for(fwd.vocab)
    changed = 0
    for request in beam_requests(12):
        plan = build_plan(fwd.vocab, prosody, request, formulas_for(fwd.model, fwd.vocab))
        rows, totals = _beam(fwd.model, plan, request)
        backward = backward_logprobs(rtl.model, plan.start_token, fwd.vocab.eos_id, [r.tokens for r in rows])
        combined = [f + b for f, b in zip(totals, backward)]
        plain = generate_one(fwd.model, fwd.vocab, prosody, request)
        reranked = generate_one(fwd.model, fwd.vocab, prosody, request, backward=rtl.model)
        assert plain.poem == plan.format_text(rows[0].line_texts)
        best = rows[combined.index(max(combined))]
        assert reranked.lines == best.line_texts
        assert reranked.score == pytest.approx(totals[combined.index(max(combined))], abs=1e-4)
        changed += reranked.poem != plain.poem
    assert changed > 0  # the rerank really chose another beam somewhere


# -- serving --------------------------------------------------------------------------------------------------
async def test_the_engine_reranks_beams_as_the_reference_does_alone_or_in_a_crowd(paired_store, tiny_checkpoint,
                                                                                 tiny_rtl_checkpoint):
    requests = beam_requests(16) + [PoemRequest(form="qijue", mode="sample", seed=3).validate()]
    fwd, rtl = load_checkpoint(tiny_checkpoint), load_checkpoint(tiny_rtl_checkpoint)
    prosody = prosody_for(fwd.vocab)
    async with LocalEngine(engine_settings(paired_store)) as engine:
        together = await asyncio.gather(*(engine.generate(r) for r in requests))
        alone = [await engine.generate(r) for r in requests]
        models = {m["name"]: m for m in await engine.models()}
    assert models["lstm"]["reranker"] == {"name": "lstm-rtl", "version": read_meta(tiny_rtl_checkpoint)["version"]}
    assert models["gru"]["reranker"] is None
    for request, a, b in zip(requests, together, alone):
        assert (a.poem, a.score) == (b.poem, b.score)
        ref = generate_one(fwd.model, fwd.vocab, prosody, request, backward=rtl.model)
        assert a.poem == ref.poem and math.isclose(a.score, ref.score, abs_tol=1e-3)


async def test_with_rerank_off_the_engine_returns_the_best_scoring_beam(paired_store, tiny_checkpoint):
    requests = beam_requests(8)
    fwd = load_checkpoint(tiny_checkpoint)
    prosody = prosody_for(fwd.vocab)
    async with LocalEngine(engine_settings(paired_store, rerank=False)) as engine:
        results = [await engine.generate(r) for r in requests]
        models = {m["name"]: m for m in await engine.models()}
    assert models["lstm"]["reranker"] is None
    for request, result in zip(requests, results):
        assert result.poem == generate_one(fwd.model, fwd.vocab, prosody, request).poem


def test_engine_rerank_setting_is_on_or_off_and_nothing_else():
    assert EngineSettings.from_env({"ENGINE_RERANK": "off"}).rerank is False
    assert EngineSettings.from_env({}).rerank is True
    with pytest.raises(ValueError, match="ENGINE_RERANK"):
        EngineSettings.from_env({"ENGINE_RERANK": "yes"})


def test_a_companion_of_another_vocabulary_is_left_out_and_the_model_still_serves(
        checkpoint_store, tiny_gru_checkpoint, empty_package_dir, tiny_ci_checkpoint, caplog):
    store.publish(checkpoint_store, "lstm-rtl", tiny_ci_checkpoint)  # left to right, and another vocabulary
    registry = ModelRegistry(checkpoint_store, ("lstm", "gru"), package_dir=empty_package_dir)
    registry.load_initial()
    assert registry.get("lstm").backward is None and registry.get("lstm").info()["reranker"] is None
    assert "no reranking by lstm-rtl" in caplog.text


def test_a_right_to_left_model_is_refused_as_a_writer(checkpoint_store, tiny_rtl_checkpoint, empty_package_dir):
    store.publish(checkpoint_store, "lstm-rtl", tiny_rtl_checkpoint)
    registry = ModelRegistry(checkpoint_store, ("lstm-rtl",), package_dir=empty_package_dir)
    registry.load_initial()
    assert registry.loaded_names() == []
    assert "right-to-left" in registry.refused()["lstm-rtl"]["reason"]


def test_a_newly_published_companion_is_attached_on_reload_without_swapping_the_model(
        checkpoint_store, tiny_rtl_checkpoint, empty_package_dir):
    registry = ModelRegistry(checkpoint_store, ("lstm", "gru"), package_dir=empty_package_dir)
    registry.load_initial()
    serving = registry.get("lstm")
    assert serving.backward is None and registry.newer_names() == []
    store.publish(checkpoint_store, "lstm-rtl", tiny_rtl_checkpoint)
    assert registry.newer_names() == ["lstm"]
    report = registry.reload("lstm")
    assert report["lstm"]["status"] == "unchanged"
    assert registry.get("lstm") is serving and serving.backward is not None
    assert registry.newer_names() == []
