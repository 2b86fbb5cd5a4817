"""The engine on a GPU: the shipped models resident on CUDA, every mode batched, every poem well formed.

Skipped without CUDA (CI has none); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
Plain functions driving asyncio.run, so that only pytest itself is needed there.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from engine.api import PoemRequest
from engine.poem.forms import FORMS
from engine.model.checkpoint import PACKAGE_CHECKPOINTS
from engine.serving.local import EngineSettings, LocalEngine
from engine.poem.judge import check_poem

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Two shipped models, of those this tree carries (a GPU lease's branch leaves some out: docs/TRAINING.md, §7).
MODELS = tuple(n for n in ("lstm", "gru", "lstm-large") if (PACKAGE_CHECKPOINTS / f"{n}.safetensors").exists())[:2]


def requests() -> list[PoemRequest]:
    combos = itertools.product(("greedy", "sample", "beam"), FORMS, ("", "月"))
    return [PoemRequest(prompt=prompt, form=form, mode=mode, beam_width=5, seed=i, model=model).validate()
            for i, ((mode, form, prompt), model) in enumerate(zip(combos, itertools.cycle(MODELS)))]


async def serve(batch: list[PoemRequest], row_state: str = "host"):
    settings = EngineSettings(model_names=MODELS, device="cuda", watch_interval=0.0, row_state=row_state)
    async with LocalEngine(settings) as engine:
        together = await asyncio.gather(*(engine.generate(r) for r in batch))
        again = await asyncio.gather(*(engine.generate(r) for r in batch))
        devices = {s.name: next(s.model.parameters()).device.type for s in engine.registry.all_serving()}
        status = await engine.status()
    return together, again, devices, status


def test_the_engine_serves_every_mode_and_form_from_models_resident_on_cuda():
    batch = requests()
    together, again, devices, status = asyncio.run(serve(batch))
    assert devices == dict.fromkeys(MODELS, "cuda") and status["device"].startswith("cuda")
    assert status["choice"] == "torch"  # the C kernels are for the CPU
    for request, result in zip(batch, together):
        check = check_poem(result.poem, request.form)
        assert check.form_valid and check.rhyme and not check.repeated_chars, (request, result.poem)
        assert result.poem.startswith(request.prompt) and result.model["name"] == request.model
    # The same batch again: the same poems (cuBLAS kernels are chosen by shape, and the shapes repeat).
    assert [r.poem for r in again] == [r.poem for r in together]
    assert status["requests"]["completed"] == 2 * len(batch) and status["running_rows"] == 0
    assert status["row_state"] == dict.fromkeys(MODELS, "host")  # the default, on a GPU too


def test_device_rows_and_host_rows_write_the_same_poems_on_cuda():
    batch = requests()
    device, *_ = asyncio.run(serve(batch, "device"))
    host, *_ = asyncio.run(serve(batch, "host"))
    assert [(r.poem, r.notes) for r in device] == [(r.poem, r.notes) for r in host]


def test_the_sampler_draws_only_from_the_nucleus_on_cuda():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, generator=gen) * 3).cuda()
    logits[::3] = float("-inf")
    probs = torch.softmax(logits.double(), dim=-1)
    ordered, _ = probs.sort(descending=True)
    kept = probs >= ordered[int((ordered.cumsum(0) < 0.9).sum())]
    from engine.sampling.choice import sample_batch, sample_sorted

    n = 2000
    args = (torch.ones(n), torch.zeros(n, dtype=torch.long), torch.full((n,), 0.9), torch.rand(n, generator=gen))
    for sampler in (sample_batch, sample_sorted):
        draws = sampler(logits.expand(n, -1), *args)
        assert draws.device.type == "cuda" and kept[draws].all()


def test_graph_rows_capture_their_step_and_replay_it_to_the_same_poems_on_cuda():
    from test_graph_batch import drive  # noqa: PLC0415  (tests/ is on sys.path)

    from engine.serving.graph_batch import GraphBatch

    batch = [r for r in requests() if r.model == MODELS[0]]

    async def serving():
        async with LocalEngine(EngineSettings(model_names=MODELS[:1], device="cuda", watch_interval=0.0)) as engine:
            return engine.registry.get(MODELS[0])

    model = asyncio.run(serving())
    joins = [i % 4 * 5 for i in range(len(batch))]  # requests join at four steps: layouts change, rows move
    captured, eager = GraphBatch(model, min_rows=16, graphs=True), GraphBatch(model, min_rows=16, graphs=False)
    poems = drive(captured, batch, joins)
    assert captured.capture_error is None and captured.captures >= 2
    assert [(r.poem, r.notes) for r in poems] == [(r.poem, r.notes) for r in drive(eager, batch, joins)]
    for request, result in zip(batch, poems):
        check = check_poem(result.poem, request.form)
        assert check.form_valid and check.rhyme and not check.repeated_chars, (request, result.poem)


def test_the_engine_serves_graph_rows_on_cuda():
    batch = requests()
    together, again, _, status = asyncio.run(serve(batch, "graph"))
    assert status["row_state"] == dict.fromkeys(MODELS, "graph")
    assert all(g["capture_error"] is None for g in status["graphs"])
    assert sum(g["captured"] for g in status["graphs"]) >= 1
    for request, result in zip(batch, together):
        check = check_poem(result.poem, request.form)
        assert check.form_valid and check.rhyme and not check.repeated_chars, (request, result.poem)
