"""The in-process engine: continuous batching of mixed requests, batch invariance, cancellation, deadlines."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from engine.sampling import kernels
from engine.api import PoemRequest
from engine.errors import EngineUnavailableError, QueueFullError, RequestError
from engine.poem.forms import FORMS, classify
from engine.serving.local import EngineSettings, LocalEngine
from engine_fixtures import checkpoint_store, empty_package_dir, engine_settings  # noqa: F401

MODES = ("greedy", "sample", "beam")


def mixed_requests(n: int) -> list[PoemRequest]:
    """n seeded requests cycling through modes, forms, beam widths, prompts, acrostics and both models."""
    combos = itertools.cycle(itertools.product(MODES, FORMS, (1, 3, 5, 16)))
    out = []
    for i in range(n):
        mode, form, width = next(combos)
        acrostic = "春江花月夜山水风"[: FORMS[form].num_lines] if i % 7 == 3 else None
        out.append(PoemRequest(prompt="" if acrostic or i % 3 else "月", form=form, mode=mode, beam_width=width,
                               acrostic=acrostic, seed=1000 + i, model="gru" if i % 5 == 4 else None,
                               rhyme=i % 4 != 1, tone=i % 6 != 2).validate())
    return out


def same_poem(a, b) -> bool:
    return (a.poem, a.model, a.notes) == (b.poem, b.model, b.notes) and a.score == b.score


async def test_mixed_concurrent_requests_all_complete_and_match_their_solo_runs(checkpoint_store):
    requests = mixed_requests(36)
    async with LocalEngine(engine_settings(checkpoint_store, max_num_rows=64)) as engine:
        together = await asyncio.gather(*(engine.generate(r) for r in requests))
        alone = [await engine.generate(r) for r in requests]
        status = await engine.status()
    for request, a, b in zip(requests, together, alone):
        assert same_poem(a, b), (request, a.poem, b.poem)
        assert classify(a.lines) is FORMS[request.form]
        assert a.mode == request.mode
        assert a.model["name"] == (request.model or "lstm")
        if request.acrostic:
            assert "".join(line[0] for line in a.lines) == request.acrostic
        elif request.prompt:
            assert a.poem.startswith(request.prompt)
    assert status["requests"]["completed"] == 72 and status["running_rows"] == 0
    assert status["choice"] == "c-kernels"  # the C kernels were built and chose every token here


@pytest.mark.parametrize("row_state", ["host", "device", "graph"])
async def test_the_engine_writes_the_reference_decoders_poem_for_every_request(checkpoint_store, row_state):
    """Batched, a request gets the poem `generate_one` writes for it alone: the same plan, penalties, draws
    and choice in every mode (the reference is what `python -m engine generate` and the benchmarks run)."""
    from engine.model.checkpoint import load_checkpoint
    from engine.model.versions import current_path
    from engine.poem.prosody import prosody_for
    from engine.reference import generate_one

    requests = mixed_requests(24)
    async with LocalEngine(engine_settings(checkpoint_store, max_num_rows=64, row_state=row_state)) as engine:
        served = await asyncio.gather(*(engine.generate(r) for r in requests))
    models = {name: load_checkpoint(current_path(checkpoint_store, name)) for name in ("lstm", "gru")}
    for request, got in zip(requests, served):
        ckpt = models[request.model or "lstm"]
        want = generate_one(ckpt.model, ckpt.vocab, prosody_for(ckpt.vocab), request)
        assert (got.poem, got.notes) == (want.poem, want.notes), request
        assert got.score == pytest.approx(want.score, rel=1e-4, abs=1e-3)  # float sums in another order


async def test_without_the_c_kernels_the_torch_path_serves_every_mode_the_same_way(checkpoint_store, monkeypatch):
    # An install without a C compiler, or a GPU, chooses with torch operations: same rules, same batch
    # invariance. (On a CPU with the kernels built, CI runs this path only here.)
    requests = mixed_requests(18)
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    async with LocalEngine(engine_settings(checkpoint_store, max_num_rows=64)) as engine:
        together = await asyncio.gather(*(engine.generate(r) for r in requests))
        alone = [await engine.generate(r) for r in requests]
        status = await engine.status()
    assert status["choice"] == "torch"
    for request, a, b in zip(requests, together, alone):
        assert same_poem(a, b), (request, a.poem, b.poem)
        assert classify(a.lines) is FORMS[request.form] and a.score < 0


@pytest.mark.parametrize("mode", MODES)
async def test_a_seeded_request_gives_the_same_poem_alone_or_in_a_full_batch(checkpoint_store, mode):
    target = PoemRequest(prompt="山", form="qilv", mode=mode, beam_width=4, seed=7)
    fillers = [PoemRequest(form="qilv", mode=m, beam_width=3, seed=i) for i, m in zip(range(40), itertools.cycle(MODES))]
    async with LocalEngine(engine_settings(checkpoint_store, max_num_rows=64)) as engine:
        alone = await engine.generate(target)
        crowd = [asyncio.ensure_future(engine.generate(r)) for r in fillers[:20]]
        await asyncio.sleep(0.05)  # the target joins a batch already running, at some row in the middle
        crowd.append(asyncio.ensure_future(engine.generate(target)))
        crowd += [asyncio.ensure_future(engine.generate(r)) for r in fillers[20:]]
        results = await asyncio.gather(*crowd)
    assert same_poem(alone, results[20])


async def test_a_sampling_request_without_a_seed_still_writes_a_valid_poem(checkpoint_store):
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        result = await engine.generate(PoemRequest(form="wujue", mode="sample"))
    assert classify(result.lines) is FORMS["wujue"]


async def test_a_request_picks_its_model_by_name_and_an_unknown_name_is_a_request_error(checkpoint_store):
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        gru = await engine.generate(PoemRequest(model="gru", mode="greedy"))
        default = await engine.generate(PoemRequest(mode="greedy"))
        with pytest.raises(RequestError) as info:
            await engine.generate(PoemRequest(model="transformer"))
    assert gru.model["name"] == "gru" and default.model["name"] == "lstm"
    assert info.value.field == "model"


async def test_a_prompt_the_model_cannot_write_is_refused_before_queueing(checkpoint_store):
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        with pytest.raises(RequestError) as info:
            await engine.generate(PoemRequest(prompt="龘"))
        assert (await engine.status())["requests"]["completed"] == 0
    assert info.value.code == "unknown_character" and info.value.field == "prompt"


async def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("row_state", ["host", "device", "graph"])
async def test_a_cancelled_request_frees_its_rows_for_the_next_one(checkpoint_store, row_state):
    async with LocalEngine(engine_settings(checkpoint_store, max_num_rows=16, row_state=row_state)) as engine:
        wide = asyncio.ensure_future(engine.generate(PoemRequest(form="qilv", mode="beam", beam_width=16)))
        await wait_for(lambda: _rows(engine, 16))
        waiting = asyncio.ensure_future(engine.generate(PoemRequest(form="wujue", mode="greedy")))
        await wait_for(lambda: _queue(engine, 1))
        wide.cancel()
        result = await asyncio.wait_for(waiting, 10)
        status = await engine.status()
    assert wide.cancelled() and classify(result.lines) is FORMS["wujue"]
    assert status["requests"]["cancelled"] == 1 and status["running_rows"] == 0


async def _rows(engine, n):
    return (await engine.status())["running_rows"] == n


async def _queue(engine, n):
    return (await engine.status())["queue_depth"] == n


async def test_a_request_past_its_deadline_times_out_and_frees_its_rows(checkpoint_store):
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        with pytest.raises(TimeoutError):
            await engine.generate(PoemRequest(form="qilv", mode="beam", beam_width=16, timeout=0.001))
        await wait_for(lambda: _rows(engine, 0))
        assert (await engine.status())["requests"]["expired"] == 1


async def test_a_full_queue_raises_queue_full_at_once(checkpoint_store):
    async with LocalEngine(engine_settings(checkpoint_store, max_num_rows=16, max_queue=2)) as engine:
        tasks = [asyncio.ensure_future(engine.generate(PoemRequest(form="qilv", mode="beam", beam_width=16)))
                 for _ in range(6)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        status = await engine.status()
    rejected = [r for r in results if isinstance(r, QueueFullError)]
    # 2 wait in the queue, 1 runs (16 rows); how many the step loop took in between the arrivals depends on
    # the machine, but six cannot all be taken: some are refused at once, the rest finish.
    assert rejected and status["requests"]["rejected"] == len(rejected)
    assert status["requests"]["completed"] == 6 - len(rejected)
    assert all(classify(r.lines) is FORMS["qilv"] for r in results if not isinstance(r, QueueFullError))
    assert all(r.retry_after > 0 for r in rejected)


async def test_close_drains_in_flight_requests_and_then_refuses_new_ones(checkpoint_store):
    engine = LocalEngine(engine_settings(checkpoint_store))
    await engine.start()
    tasks = [asyncio.ensure_future(engine.generate(PoemRequest(form="qilv", mode=m, seed=1))) for m in MODES * 3]
    await asyncio.sleep(0.01)
    await engine.close()
    results = await asyncio.gather(*tasks)
    assert all(classify(r.lines) is FORMS["qilv"] for r in results)
    with pytest.raises(EngineUnavailableError):
        await engine.generate(PoemRequest())


async def test_an_engine_with_no_loadable_model_is_not_ready(tmp_path, empty_package_dir):
    settings = EngineSettings(checkpoint_dir=str(tmp_path / "empty"), device="cpu", watch_interval=0)
    engine = LocalEngine(settings)
    engine.registry.package_dir = empty_package_dir
    async with engine:
        assert not engine.ready
        with pytest.raises(EngineUnavailableError):
            await engine.generate(PoemRequest())


def test_settings_come_from_the_environment():
    s = EngineSettings.from_env({"CHECKPOINT_DIR": "/srv/ckpt", "DEVICE": "cpu", "ENGINE_MODELS": "gru, lstm",
                                 "ENGINE_MAX_ROWS": "128", "ENGINE_MAX_QUEUE": "9", "ENGINE_THREADS": "1"})
    assert (s.checkpoint_dir, s.device, s.model_names, s.max_num_rows, s.max_queue, s.threads) == \
        ("/srv/ckpt", "cpu", ("gru", "lstm"), 128, 9, 1)
    with pytest.raises(ValueError, match="ENGINE_MAX_ROWS"):
        EngineSettings.from_env({"ENGINE_MAX_ROWS": "lots"})


@pytest.mark.parametrize("key, value", [("ENGINE_THREADS", "-1"), ("ENGINE_TIMEOUT", "nan"), ("ENGINE_TIMEOUT", "-1"),
                                        ("ENGINE_TIMEOUT", "inf"), ("ENGINE_WATCH_INTERVAL", "nan")])
def test_settings_that_would_stop_the_step_loop_or_every_deadline_are_refused(key, value):
    """ENGINE_THREADS=-1 killed the step loop at its first line (requests then hung with /readyz 200), and
    ENGINE_TIMEOUT=nan served requests without any deadline (no comparison with nan is ever true)."""
    with pytest.raises(ValueError, match=key):
        EngineSettings.from_env({key: value})


async def test_a_step_loop_that_dies_fails_every_waiting_request_and_readiness(checkpoint_store, monkeypatch):
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        assert engine.ready
        await engine.generate(PoemRequest(mode="greedy"))

        def broken(now):  # a bug outside the runner's own error handling
            raise RuntimeError("scheduler bug")

        monkeypatch.setattr(engine.scheduler, "schedule", broken)
        # The loop may meet the broken schedule before this request or with it: refused at the door, or failed
        # while waiting; never left hanging (which wait_for would turn into a TimeoutError).
        with pytest.raises(EngineUnavailableError, match="step loop stopped|not running"):
            await asyncio.wait_for(engine.generate(PoemRequest(mode="greedy")), timeout=20)
        assert not engine.ready
        with pytest.raises(EngineUnavailableError):
            await engine.generate(PoemRequest(mode="greedy"))


async def test_the_step_reads_kept_ordinary_tensors_that_c_plus_plus_also_holds(checkpoint_store, monkeypatch):
    # The traced step must not be the last C++ holder of a Python-wrapped input (it would take the GIL back
    # mid-step to hand the object to Python): its inputs are buffers kept across steps, ordinary tensors,
    # each with a view whose _base holds it.
    from engine.serving import runner

    made = []  # every batch the runner makes, held here: the runner drops an emptied batch at any later step

    class Recorded(runner.ModelBatch):
        def __init__(self, serving):
            super().__init__(serving)
            made.append(self)

    monkeypatch.setattr(runner, "ModelBatch", Recorded)
    seen = []
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        for seed in range(3):
            await engine.generate(PoemRequest(form="qilv", mode="greedy", seed=seed))
            seen.append(made[-1].step_inputs)  # the batch the request ran in (made now, or kept from before)
    assert all(s is not None for s in seen) and len(seen) == 3
    tokens, state, tokens_view, state_view = seen[-1]
    assert not tokens.is_inference() and not state.is_inference()
    assert tokens_view._base is tokens and state_view._base is state
    assert tokens.shape == (16,) and state.shape[1] == 16  # padded to min_batch_rows


async def test_the_catch_up_thread_runs_beside_the_steps_and_stops_with_the_engine(checkpoint_store):
    import threading

    before = set(threading.enumerate())
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        await engine.generate(PoemRequest(form="wujue", mode="greedy"))
        helpers = [t for t in set(threading.enumerate()) - before if t.name.startswith("yinshi-catch-up")]
        assert len(helpers) == 1 and helpers[0].is_alive()
    helpers[0].join(timeout=5)
    assert not helpers[0].is_alive() and engine.runner._pool is None


async def test_a_ci_while_the_configured_ci_model_is_not_loaded_is_unavailable_not_a_bad_request(
        checkpoint_store, empty_package_dir):
    """ci configured but not loaded (no version in the store, none in the package): a 词 got a 400 telling the
    user to add ci to ENGINE_MODELS, which names it already; it is a 503 to retry, as with "model": "ci"."""
    engine = LocalEngine(engine_settings(checkpoint_store, model_names=("lstm", "ci")))
    engine.registry.package_dir = empty_package_dir
    async with engine:
        assert engine.loaded_names() == ["lstm"]
        with pytest.raises(EngineUnavailableError, match="not loaded: ci"):
            await engine.generate(PoemRequest(form="ci", tune="浣溪沙"))


async def test_an_answer_a_future_refuses_does_not_strand_the_others_of_its_step(checkpoint_store):
    """A step's poems reach their callers in one hand-off; one answer that cannot be set must not stop the rest."""
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        loop = asyncio.get_running_loop()
        futures = {name: loop.create_future() for name in "abc"}
        engine._futures.update({name: (future, loop) for name, future in futures.items()})
        engine._resolve_all([("a", 1), ("b", StopIteration()), ("c", 3)])  # a future refuses StopIteration
        assert await asyncio.wait_for(futures["c"], 5) == 3 and futures["a"].result() == 1
        with pytest.raises(RuntimeError, match="could not be handed over"):
            futures["b"].result()
        for name in futures:
            engine._futures.pop(name)
