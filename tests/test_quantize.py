"""ENGINE_QUANTIZE=int8: the models run as int8 on a CPU; every poem stays well formed, the perplexity close."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_fixtures import checkpoint_store, engine_settings  # noqa: F401
from test_hotswap import new_version

from engine.api import PoemRequest
from engine.model import versions as store
from engine.model.checkpoint import load_checkpoint
from engine.model.network import quantize_int8
from engine.poem.forms import FORMS, classify
from engine.serving.local import EngineSettings, LocalEngine
from trainer.corpus import load_corpus, split
from trainer.evaluate import perplexity


def test_int8_is_a_checked_setting_for_a_cpu_engine():
    assert EngineSettings.from_env({"ENGINE_QUANTIZE": "int8"}).quantize == "int8"
    with pytest.raises(ValueError, match="ENGINE_QUANTIZE"):
        EngineSettings.from_env({"ENGINE_QUANTIZE": "int4"})
    with pytest.raises(ValueError, match="CPU engine"):
        EngineSettings.from_env({"ENGINE_QUANTIZE": "int8", "DEVICE": "cuda"})


def test_an_int8_model_scores_held_out_poems_close_to_its_float_self(tiny_checkpoint, tiny_corpus):
    ckpt = load_checkpoint(tiny_checkpoint)
    _, held_out = split(load_corpus([str(tiny_corpus)]).regular())
    quantized = quantize_int8(ckpt.model)
    exact, fast = perplexity(ckpt.model, ckpt.vocab, held_out), perplexity(quantized, ckpt.vocab, held_out)
    assert fast["ppl"] == pytest.approx(exact["ppl"], rel=0.05)
    assert quantized.num_parameters() == ckpt.model.num_parameters()
    assert isinstance(quantized.rnn, torch.ao.nn.quantized.dynamic.LSTM)  # really int8, not a float copy


async def test_an_int8_engine_writes_well_formed_poems_in_every_mode_and_after_a_swap(checkpoint_store,
                                                                                     tiny_checkpoint, tmp_path):
    requests = [PoemRequest(form=form, mode=mode, seed=i, beam_width=3, prompt="月" if i % 2 else "").validate()
                for i, (form, mode) in enumerate((f, m) for f in FORMS for m in ("greedy", "sample", "beam"))]
    async with LocalEngine(engine_settings(checkpoint_store, quantize="int8")) as engine:
        before = await asyncio.gather(*(engine.generate(r) for r in requests))
        store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "v2.safetensors"))
        report = await engine.reload("lstm")
        after = await asyncio.gather(*(engine.generate(r) for r in requests))
        models = {m["name"]: m for m in await engine.models()}
    assert report["lstm"]["status"] == "swapped"
    assert models["lstm"]["quantized"] == "int8" and models["gru"]["quantized"] == "int8"
    for request, result in zip(requests * 2, before + after):
        assert classify(result.lines) is FORMS[request.form] and result.poem.startswith(request.prompt)
