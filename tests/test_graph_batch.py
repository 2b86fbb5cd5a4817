"""A GraphBatch (ENGINE_ROW_STATE=graph) keeps its rows in fixed slots: layouts change only at region bounds,
freed slots are reused, and the poems are the host rows' whatever slot a request lands in.

On the CPU the step runs eagerly (the function a GPU captures); tests/test_cuda.py captures and replays it.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from engine_fixtures import checkpoint_store, engine_settings  # noqa: F401
from test_device_rows import varied_requests

from engine.api import PoemRequest
from engine.serving.graph_batch import GraphBatch, SlotLayout, bucket, refit
from engine.serving.local import LocalEngine
from engine.serving.scheduler import EngineRequest


def test_regions_are_powers_of_two_that_grow_when_full_and_never_shrink():
    assert [bucket(n) for n in (0, 1, 2, 3, 5, 16, 17)] == [0, 1, 2, 4, 8, 16, 32]
    assert refit(8, 8) == 8 and refit(8, 9) == 16  # full, then over
    assert refit(8, 1) == 8 and refit(4, 0) == 4  # never smaller while the batch runs
    assert refit(0, 0) == 0 and refit(0, 3) == 4


def test_a_layout_puts_sample_rows_first_then_beam_groups_by_width_padded_to_the_minimum():
    layout = SlotLayout.fit(None, {0: 3, 5: 2, 3: 1}, min_rows=16)
    assert layout == SlotLayout(sample=4, beams=((3, 1), (5, 2)))
    assert layout.num_rows == 4 + 3 + 10 and layout.segments() == [(3, 4, 7), (5, 7, 17)]
    assert layout.region(0) == (0, 4) and layout.region(5) == (7, 17)
    assert [layout.pad_score(s) for s in (0, 4, 5, 7, 8, 12)] == [0.0, 0.0, float("-inf"), 0.0, float("-inf"), 0.0]
    # Few rows: the sample region pads the batch to min_rows (a CPU's BLAS is batch-invariant from 16 rows).
    assert SlotLayout.fit(None, {5: 1}, min_rows=16) == SlotLayout(sample=11, beams=((5, 1),))
    # Requests coming and going inside the bounds keep the layout, a width that empties too; past them it grows.
    assert SlotLayout.fit(layout, {0: 4, 5: 2, 3: 1}, 16) == SlotLayout.fit(layout, {5: 1}, 16) == layout
    assert SlotLayout.fit(layout, {0: 5, 5: 1}, 16) == SlotLayout(sample=8, beams=((3, 1), (5, 2)))


async def test_requests_that_come_go_and_are_cancelled_get_the_host_rows_poems(checkpoint_store, monkeypatch):
    layouts = []
    relayout = GraphBatch._relayout

    def record(self, layout, staying):
        layouts.append((layout, len(staying)))
        return relayout(self, layout, staying)

    monkeypatch.setattr(GraphBatch, "_relayout", record)
    requests = varied_requests(60)

    async def serve(row_state):
        async with LocalEngine(engine_settings(checkpoint_store, max_num_rows=48, max_queue=128,
                                               row_state=row_state)) as engine:
            first = [asyncio.ensure_future(engine.generate(r)) for r in requests[:40]]
            await asyncio.sleep(0)
            doomed = [asyncio.ensure_future(engine.generate(r)) for r in requests[40:44]]
            await asyncio.sleep(0.2)
            for task in doomed:
                task.cancel()
            later = [await engine.generate(r) for r in requests[44:48]]  # one at a time: a nearly empty batch
            rest = await asyncio.gather(*(engine.generate(r) for r in requests[48:]))
            poems = [*(await asyncio.gather(*first)), *later, *rest]
            batches = list(engine.runner.batches.values())
            status = await engine.status()
        return poems, batches, status

    host, _, _ = await serve("host")
    graph, batches, status = await serve("graph")
    assert {type(b) for b in batches} == {GraphBatch}
    assert status["row_state"] == {"lstm": "graph", "gru": "graph"} and status["running_rows"] == 0
    for a, b in zip(host, graph):
        assert (a.poem, a.notes, a.model) == (b.poem, b.notes, b.model)
        assert b.score == pytest.approx(a.score, rel=1e-4, abs=1e-3)
    # Layouts grew with the burst, started small again for the lone requests, and carried running rows across.
    sizes = [layout.num_rows for layout, _ in layouts]
    assert max(sizes) >= 32 and min(sizes) == 16 and any(staying for _, staying in layouts)
    # Empty now, each batch keeps its buffers for the next request; no slot is held by a finished request.
    assert all(b.slab is None and not b.groups and b.slabs for b in batches)


def drive(batch: GraphBatch, requests, joins_at: list[int]) -> list:
    """Step `batch` alone until every request (joining at its step in `joins_at`) has its poem."""
    poems, step = {}, 0
    while len(poems) < len(requests):
        for i, request in enumerate(requests):
            if joins_at[i] == step:
                rows = request.beam_width if request.mode == "beam" else 1
                batch.add(EngineRequest(str(i), request, rows, 0.0), batch.serving.make_plan(request))
        poems.update(batch.step() or {})
        step += 1
    return [poems[str(i)] for i in range(len(requests))]


async def test_a_batch_stepped_alone_writes_the_engines_poems(checkpoint_store, tiny_checkpoint):
    # What tests/test_cuda.py runs captured and eagerly, here eagerly against the host rows.
    requests = [replace(r, model="lstm") for r in varied_requests(30)]
    async with LocalEngine(engine_settings(checkpoint_store, max_num_rows=96, row_state="host")) as engine:
        host = await asyncio.gather(*(engine.generate(r) for r in requests))
        serving = engine.registry.get("lstm")
    batch = GraphBatch(serving, min_rows=16, graphs=False)
    graph = drive(batch, requests, [i % 5 * 4 for i in range(len(requests))])
    assert [(r.poem, r.notes) for r in graph] == [(r.poem, r.notes) for r in host]
    assert len(batch.slabs) >= 2 and batch.captures == 0


def test_packed_rows_are_views_of_one_buffer_per_dtype(tiny_checkpoint):
    import torch

    from engine.poem.device_rows import DeviceRows, device_tables
    from engine.serving.graph_batch import Packing
    from engine.serving.registry import build_serving

    serving = build_serving("lstm", tiny_checkpoint, torch.device("cpu"))
    tables = device_tables(serving.prosody, torch.device("cpu"))
    plans = [serving.make_plan(PoemRequest(form=f, prompt="月").validate()) for f in ("wujue", "qilv")]
    rows = DeviceRows.new(tables, None, None, [(plans[0], 1, 1.5, (0.4, 5, 1.0), torch.Generator().manual_seed(1), 0),
                                               (plans[1], 3, 1.5, (1.0, 0, 1.0), torch.Generator().manual_seed(2), 9)])
    packing = Packing.of(rows)
    buffers = packing.pack(rows)
    assert {t.dtype for t in buffers.values()} == set(buffers) and len(buffers) <= 4
    views = packing.views(buffers)
    for name in rows._tensors():
        assert torch.equal(views[name], getattr(rows, name)), name
        assert views[name].untyped_storage().data_ptr() == buffers[views[name].dtype].untyped_storage().data_ptr()
    views["history"][2, 5] = 7  # a write through a view lands in the buffer
    assert int(packing.views(buffers)["history"][2, 5]) == 7


async def test_a_poem_is_read_a_step_late_and_dropped_if_its_request_left_meanwhile(checkpoint_store):
    async with LocalEngine(engine_settings(checkpoint_store, row_state="host")) as engine:
        serving = engine.registry.get("lstm")
    request = PoemRequest(form="wujue", mode="greedy", seed=3).validate()

    def started() -> GraphBatch:
        batch = GraphBatch(serving, min_rows=16, graphs=False)
        batch.add(EngineRequest("a", request, 1, 0.0), serving.make_plan(request))
        return batch

    batch, steps, poems = started(), 0, {}
    while not poems:
        poems = batch.step()
        steps += 1
    plan = serving.make_plan(request)
    assert steps == plan.num_steps + 1 and set(poems) == {"a"}  # its last step, then the step that reads it
    assert batch.step() is None  # empty, nothing owed
    batch = started()
    for _ in range(plan.num_steps):
        assert batch.step() == {}
    batch.remove({"a"})  # cancelled after its last step, before the read
    assert batch.step() == {} and batch.step() is None


async def test_graph_rows_on_a_cpu_say_at_start_that_they_are_for_a_gpu(checkpoint_store, caplog):
    async with LocalEngine(engine_settings(checkpoint_store, row_state="graph")):
        pass
    assert any("ENGINE_ROW_STATE=graph on a CPU" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with LocalEngine(engine_settings(checkpoint_store, row_state="host")):
        pass
    assert not any("ENGINE_ROW_STATE" in r.getMessage() for r in caplog.records)
