"""Hot-swap: a new published version is validated and swapped in under load; a bad one is refused."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from engine.model import versions as store
from engine.api import PoemRequest
from engine.model.checkpoint import load_checkpoint, save_checkpoint
from engine.poem.forms import FORMS, classify
from engine.serving.local import LocalEngine
from engine_fixtures import checkpoint_store, empty_package_dir, engine_settings  # noqa: F401


def new_version(src: Path, dst: Path, **meta) -> Path:
    """The same weights saved again: a new version (a new timestamp), with `meta` over the old metadata."""
    time.sleep(0.002)  # versions have millisecond resolution
    ckpt = load_checkpoint(src)
    keep = {k: ckpt.meta[k] for k in ("metrics", "corpus_hash", "train") if k in ckpt.meta}
    save_checkpoint(dst, ckpt.model, ckpt.vocab, keep | meta)
    return dst


def publish_raw(root: Path, name: str, version: str, data: bytes) -> None:
    """Put bytes into the store as a version and point CURRENT at them, bypassing publish()'s and
    set_current()'s checks (as a file that rots on disk after CURRENT named it would)."""
    path = store.version_path(root, name, version)
    path.write_bytes(data)
    (root / name / "CURRENT").write_text(f"{version}\n")


@pytest.mark.parametrize("row_state", ["host", "device", "graph"])
async def test_a_swap_under_a_stream_of_requests_drops_none(checkpoint_store, tiny_checkpoint, tmp_path, row_state):
    async with LocalEngine(engine_settings(checkpoint_store, max_num_rows=32, row_state=row_state)) as engine:
        old = (await engine.models())[0]["version"]
        modes = ["greedy", "sample", "beam"]
        stream = [asyncio.ensure_future(engine.generate(PoemRequest(form="qilv", mode=modes[i % 3], seed=i,
                                                                   beam_width=4)))
                  for i in range(30)]
        await asyncio.sleep(0.05)
        new = store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "v2.safetensors"))
        report = await engine.reload()
        stream += [asyncio.ensure_future(engine.generate(PoemRequest(form="wujue", mode=modes[i % 3], seed=i)))
                   for i in range(30)]
        results = await asyncio.gather(*stream)
        models = await engine.models()
        status = await engine.status()
        # The old version's batch went once its last rows finished (an empty graph batch of the serving one stays).
        kept = {b.serving.version for b in engine.runner.batches.values() if b.serving.name == "lstm"}
    assert kept <= {new}
    assert report["lstm"] == {"status": "swapped", "version": new, "previous": old}
    assert report["gru"]["status"] == "unchanged"
    assert all(classify(r.lines) is FORMS[r.form] for r in results)
    versions = [r.model["version"] for r in results]
    assert versions[0] == old  # running when the swap came: finished on the version it started on
    assert set(versions[30:]) == {new}  # after the swap every new request gets the new version
    assert models[0]["version"] == new and status["swaps"] == 1
    assert status["requests"]["completed"] == 60 and status["running_rows"] == 0


async def test_a_corrupt_checkpoint_is_refused_and_the_old_version_keeps_serving(checkpoint_store, tiny_checkpoint):
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        old = (await engine.models())[0]["version"]
        data = bytearray(tiny_checkpoint.read_bytes())
        data[-10] ^= 0xFF  # a flipped byte in the weights: the values still parse, the SHA-256 does not match
        publish_raw(checkpoint_store, "lstm", "29990101T000000000Z", bytes(data))
        report = await engine.reload("lstm")
        result = await engine.generate(PoemRequest(mode="greedy"))
        status = await engine.status()
        engine.refresh_gauges()
        metrics = engine.metrics.render().decode()
    assert report["lstm"]["status"] == "refused" and "SHA-256" in report["lstm"]["reason"]
    assert result.model["version"] == old
    assert status["failed_validations"] == 1 and status["refused_versions"]["lstm"]["version"] == "29990101T000000000Z"
    assert 'yinshi_failed_validations_total{model="lstm"} 1.0' in metrics


async def test_a_truncated_checkpoint_is_refused(checkpoint_store, tiny_checkpoint):
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        publish_raw(checkpoint_store, "gru", "29990101T000000000Z", tiny_checkpoint.read_bytes()[:500])
        report = await engine.reload("gru")
        assert (await engine.generate(PoemRequest(model="gru", mode="greedy"))).model["name"] == "gru"
    assert report["gru"]["status"] == "refused"


async def test_a_version_with_a_much_worse_validation_perplexity_is_refused(checkpoint_store, tiny_checkpoint, tmp_path):
    ckpt_meta = load_checkpoint(tiny_checkpoint).meta
    worse = {**ckpt_meta["metrics"], "val_ppl": ckpt_meta["metrics"]["val_ppl"] * 1.5}
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        old = (await engine.models())[0]["version"]
        store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "w.safetensors", metrics=worse))
        report = await engine.reload("lstm")
        assert (await engine.models())[0]["version"] == old
    assert report["lstm"]["status"] == "refused" and "val_ppl" in report["lstm"]["reason"]


async def test_a_checkpoint_outside_the_checkpoint_directory_is_refused(checkpoint_store, tiny_checkpoint, tmp_path):
    outside = new_version(tiny_checkpoint, tmp_path / "elsewhere" / "evil.safetensors")
    link = store.version_path(checkpoint_store, "lstm", "29990101T000000000Z")
    os.symlink(outside, link)
    store.set_current(checkpoint_store, "lstm", "29990101T000000000Z")
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        report = await engine.reload("lstm")
        # At start-up too the store's CURRENT was refused; the model fell back to nothing in the store.
    assert report["lstm"]["status"] == "refused" and "outside" in report["lstm"]["reason"]


async def test_the_watcher_swaps_in_a_newly_published_version_by_itself(checkpoint_store, tiny_checkpoint, tmp_path):
    async with LocalEngine(engine_settings(checkpoint_store, watch_interval=0.05)) as engine:
        new = store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "v2.safetensors"))
        deadline = time.monotonic() + 20
        while (await engine.models())[0]["version"] != new:
            assert time.monotonic() < deadline, "the watcher never swapped"
            await asyncio.sleep(0.02)
        result = await engine.generate(PoemRequest(mode="greedy"))
    assert result.model["version"] == new


async def test_a_refused_version_is_not_retried_until_current_changes(checkpoint_store, tiny_checkpoint):
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        publish_raw(checkpoint_store, "lstm", "29990101T000000000Z", b"not a checkpoint")
        assert engine.registry.newer_names() == ["lstm"]
        await engine.reload("lstm")
        assert engine.registry.newer_names() == []
        assert (await engine.status())["failed_validations"] == 1


@pytest.mark.parametrize("case", ["outside", "bad name"])
async def test_a_current_refused_before_loading_is_not_retried_until_it_changes(checkpoint_store, tiny_checkpoint,
                                                                               tmp_path, case):
    """A CURRENT the store's own checks refuse (a version file linked outside the store, a CURRENT that names
    no valid version) was recorded as version "?", so every watch poll offered and refused it again."""
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        if case == "outside":
            outside = new_version(tiny_checkpoint, tmp_path / "elsewhere" / "evil.safetensors")
            os.symlink(outside, store.version_path(checkpoint_store, "lstm", "29990101T000000000Z"))
            store.set_current(checkpoint_store, "lstm", "29990101T000000000Z")
        else:
            (checkpoint_store / "lstm" / "CURRENT").write_text("../../etc/passwd\n")
        assert engine.registry.newer_names() == ["lstm"]
        assert (await engine.reload("lstm"))["lstm"]["status"] == "refused"
        for _ in range(3):  # the watcher's polls
            assert engine.registry.newer_names() == []
        assert (await engine.status())["failed_validations"] == 1
        new = store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "v2.safetensors"))
        assert engine.registry.newer_names() == ["lstm"]  # a new CURRENT is looked at again
        assert (await engine.reload("lstm"))["lstm"]["status"] == "swapped"
        assert (await engine.generate(PoemRequest(mode="greedy"))).model["version"] == new


@pytest.mark.parametrize("name", ["../etc", "LSTM", ""])
async def test_reload_of_a_model_that_is_not_configured_is_a_request_error(checkpoint_store, name):
    from engine.errors import RequestError

    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        with pytest.raises(RequestError):
            await engine.reload(name or "nope")


async def test_a_rollback_to_an_older_version_swaps_even_with_a_worse_perplexity(checkpoint_store, tiny_checkpoint,
                                                                                 tmp_path):
    meta = load_checkpoint(tiny_checkpoint).meta
    old = store.current_version(checkpoint_store, "lstm")
    better = {**meta["metrics"], "val_ppl": meta["metrics"]["val_ppl"] / 2}
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        new = store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "b.safetensors", metrics=better))
        assert (await engine.reload("lstm"))["lstm"]["status"] == "swapped"
        store.rollback(checkpoint_store, "lstm", old)
        report = await engine.reload("lstm")
        assert (await engine.models())[0]["version"] == old
    assert report["lstm"] == {"status": "swapped", "version": old, "previous": new}


async def test_a_version_that_sorts_older_but_is_no_rollback_is_still_gated(checkpoint_store, tiny_checkpoint, tmp_path):
    # A candidate saved before a hand-published version sorts older than it. Taking version order for a
    # rollback let it skip the perplexity gate; only `rollback` itself may.
    meta = load_checkpoint(tiny_checkpoint).meta
    worse = new_version(tiny_checkpoint, tmp_path / "worse.safetensors",
                        metrics={**meta["metrics"], "val_ppl": meta["metrics"]["val_ppl"] * 1.5})
    newer = store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "newer.safetensors"))
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        assert (await engine.models())[0]["version"] == newer
        older = store.publish(checkpoint_store, "lstm", worse)
        assert older < newer
        report = await engine.reload("lstm")
        assert (await engine.models())[0]["version"] == newer
    assert report["lstm"]["status"] == "refused" and "val_ppl" in report["lstm"]["reason"]


async def test_a_version_that_passed_the_trainers_gate_is_not_gated_again_on_metadata(checkpoint_store, tiny_checkpoint,
                                                                                         tmp_path):
    # The trainer scores candidate and serving on the same held-out poems; metadata val_ppl comes from each
    # checkpoint's own split. Re-gating on the metadata refused versions the trainer had published.
    meta = load_checkpoint(tiny_checkpoint).meta
    worse_meta = {**meta["metrics"], "val_ppl": meta["metrics"]["val_ppl"] * 1.5}
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        serving = (await engine.models())[0]["version"]
        new = store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "g.safetensors",
                                                                  metrics=worse_meta),
                            gate={"candidate_ppl": 80.0, "serving_ppl": 81.0, "serving_version": serving})
        report = await engine.reload("lstm")
        assert (await engine.models())[0]["version"] == new
    assert report["lstm"]["status"] == "swapped"


async def test_a_gate_verdict_for_other_weights_is_not_trusted(checkpoint_store, tiny_checkpoint, tmp_path):
    meta = load_checkpoint(tiny_checkpoint).meta
    worse_meta = {**meta["metrics"], "val_ppl": meta["metrics"]["val_ppl"] * 1.5}
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        old = (await engine.models())[0]["version"]
        new = store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "g.safetensors",
                                                                  metrics=worse_meta))
        # A verdict copied in by hand from another version: its weights digest does not match.
        (store.version_path(checkpoint_store, "lstm", new).with_suffix(".gate.json")).write_text(
            '{"passed": true, "weights_sha256": "0000"}')
        report = await engine.reload("lstm")
        assert (await engine.models())[0]["version"] == old
    assert report["lstm"]["status"] == "refused"


def make_unreadable(pointer: Path, how: str) -> None:
    """Replace a model's CURRENT with something that cannot be read as a version name."""
    pointer.unlink()
    if how == "bytes":
        pointer.write_bytes(b"\xff\xfe\x00 not utf-8\n")
    elif how == "directory":
        pointer.mkdir()
    else:
        os.mkfifo(pointer)


async def start_or_fail(engine: LocalEngine, fifo: Path) -> None:
    """engine.start(); should it block reading the FIFO, the reader is let go (a writer opens and closes it)
    so that the failure does not hang the run."""
    task = asyncio.ensure_future(engine.start())
    done, _ = await asyncio.wait({task}, timeout=60)
    if not done:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        await task
        await engine.close()
        pytest.fail("start() blocked reading a FIFO")
    await task


@pytest.mark.parametrize("how", ["bytes", "directory", "fifo"])
async def test_an_unreadable_current_refuses_that_model_alone_at_start_and_while_serving(
        checkpoint_store, empty_package_dir, tiny_checkpoint, tmp_path, caplog, how):
    """gru's CURRENT holding non-UTF-8 bytes, or being a directory, stopped the whole engine at start
    (lstm never served); a FIFO blocked start for ever; going bad while serving, it made admin reload a 500
    and the watcher log a traceback every poll."""
    gru_current = checkpoint_store / "gru" / "CURRENT"
    make_unreadable(gru_current, how)
    engine = LocalEngine(engine_settings(checkpoint_store))
    engine.registry.package_dir = empty_package_dir
    await start_or_fail(engine, gru_current)
    async with engine:
        assert engine.loaded_names() == ["lstm"] and engine.ready
        refused = (await engine.status())["refused_versions"]["gru"]
        assert "gru/CURRENT" in refused["reason"]
        assert engine.registry.newer_names() == []  # the watcher does not offer it again
        assert (await engine.reload("gru"))["gru"]["status"] == "refused"

        old = (await engine.models())[0]["version"]
        make_unreadable(checkpoint_store / "lstm" / "CURRENT", how)  # lstm's goes bad while it serves
        assert engine.registry.newer_names() == ["lstm"]  # looked at once: refused with its reason
        report = await engine.reload()
        assert report["lstm"]["status"] == "refused" and "lstm/CURRENT" in report["lstm"]["reason"]
        assert engine.registry.newer_names() == []
        assert (await engine.generate(PoemRequest(mode="greedy"))).model["version"] == old

        lstm_current = checkpoint_store / "lstm" / "CURRENT"
        lstm_current.rmdir() if lstm_current.is_dir() else lstm_current.unlink()  # repaired by a publish
        new = store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "v2.safetensors"))
        assert engine.registry.newer_names() == ["lstm"]
        assert (await engine.reload("lstm"))["lstm"]["status"] == "swapped"
        assert (await engine.generate(PoemRequest(mode="greedy"))).model["version"] == new
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    reasons = [r.getMessage() for r in caplog.records if "CURRENT" in r.getMessage()]
    assert any("gru/CURRENT" in m for m in reasons) and any("lstm/CURRENT" in m for m in reasons)


async def test_a_gate_verdict_measured_against_another_version_than_the_serving_one_is_not_trusted(
        checkpoint_store, tiny_checkpoint, tmp_path):
    """The trainer compares a candidate with the version CURRENT names, which may be one this engine refused;
    a verdict "passed" against that one let a worse model replace the good one serving."""
    meta = load_checkpoint(tiny_checkpoint).meta
    ppl = meta["metrics"]["val_ppl"]
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        good = (await engine.models())[0]["version"]
        refused = store.publish(checkpoint_store, "lstm", new_version(tiny_checkpoint, tmp_path / "bad.safetensors",
                                                                      metrics={**meta["metrics"], "val_ppl": ppl * 2}))
        assert (await engine.reload("lstm"))["lstm"]["status"] == "refused"
        # A retrain from the refused version: its candidate beats that one, not the serving one.
        candidate = new_version(tiny_checkpoint, tmp_path / "cand.safetensors",
                                metrics={**meta["metrics"], "val_ppl": ppl * 1.9})
        store.publish(checkpoint_store, "lstm", candidate, gate={"candidate_ppl": ppl * 1.9, "serving_ppl": ppl * 2,
                                                                 "serving_version": refused})
        report = await engine.reload("lstm")
        assert (await engine.models())[0]["version"] == good
        # Against the version serving, the same verdict is trusted.
        same = new_version(tiny_checkpoint, tmp_path / "t.safetensors", metrics={**meta["metrics"], "val_ppl": ppl * 1.9})
        trusted = store.publish(checkpoint_store, "lstm", same,
                                gate={"candidate_ppl": 80.0, "serving_ppl": 81.0, "serving_version": good})
        assert (await engine.reload("lstm"))["lstm"] == {"status": "swapped", "version": trusted, "previous": good}
    assert report["lstm"]["status"] == "refused" and "val_ppl" in report["lstm"]["reason"]


async def test_a_refusal_clears_once_current_names_the_serving_version_again(checkpoint_store):
    """A CURRENT that went bad and was put back stayed listed as refused until the next publish."""
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        serving = (await engine.models())[0]["version"]
        current = checkpoint_store / "lstm" / "CURRENT"
        good = current.read_bytes()
        current.write_bytes(b"\xff\xfe not utf-8\n")
        assert (await engine.reload("lstm"))["lstm"]["status"] == "refused"
        assert "lstm" in (await engine.status())["refused_versions"]
        current.write_bytes(good)  # put back: it names the version serving
        assert engine.registry.newer_names() == []
        assert "lstm" not in (await engine.status())["refused_versions"]
        assert (await engine.models())[0]["version"] == serving
