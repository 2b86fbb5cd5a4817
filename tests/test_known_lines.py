"""Known lines: the corpus lines a poem must not quote, from the trainer's table to the engine's ban."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from conftest import make_poems, write_corpus
from engine_fixtures import checkpoint_store, engine_settings  # noqa: F401

from engine.api import PoemRequest
from engine.model.checkpoint import load_checkpoint
from engine.poem.known_lines import (
    KNOWN_LINES_FILE,
    MIN_LEN,
    KnownLines,
    known_lines_from,
)
from engine.poem.prosody import prosody_for
from engine.reference import generate_one
from engine.serving.local import EngineSettings, LocalEngine
from engine.serving.registry import ModelRegistry
from trainer.__main__ import main as trainer_main
from trainer.corpus import load_corpus


def test_a_table_round_trips_and_finds_the_lines_a_head_would_complete(tmp_path):
    table = known_lines_from(["白日依山尽", "白日依山尽", "白日依山远", "春风不度玉门关", "知否", "黄河"],
                             corpus_hash="abc")
    assert len(table) == 3  # duplicates once, lines under MIN_LEN characters left out
    path = tmp_path / KNOWN_LINES_FILE
    table.save(path)
    loaded = KnownLines.load(path)
    assert np.array_equal(loaded.keys, table.keys) and np.array_equal(loaded.lasts, table.lasts)
    assert loaded.meta["corpus_hash"] == "abc"

    class Chars:  # the two things for_vocab reads from a vocabulary
        tokens = ("<pad>", "，", *"白日依山尽远春风不度玉门关")

    known = loaded.for_vocab(Chars)
    ids = {t: i for i, t in enumerate(Chars.tokens)}
    assert sorted(Chars.tokens[t] for t in known.completions([ids[c] for c in "白日依山"])) == ["尽", "远"]
    assert [Chars.tokens[t] for t in known.completions([ids[c] for c in "春风不度玉门"])] == ["关"]
    assert known.completions([ids[c] for c in "春风不度"]) == []  # a 5-character line with that head is not known
    assert known.completions([ids[c] for c in "白日"]) == []  # shorter than MIN_LEN
    assert known.width == 2
    assert loaded.for_vocab(Chars) is known  # once per vocabulary


def test_a_file_that_is_not_a_table_is_refused_with_a_reason(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="cannot read"):
        KnownLines.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a known-lines table"):
        KnownLines.load(tiny_checkpoint)
    (tmp_path / "junk").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="cannot read"):
        KnownLines.load(tmp_path / "junk")
    table = known_lines_from(["白日依山尽", "春风不度玉门关"])
    table.keys = table.keys[::-1].copy()
    table.save(tmp_path / "unsorted")
    with pytest.raises(ValueError, match="not sorted"):
        KnownLines.load(tmp_path / "unsorted")


def free_lines(result, prompt: str) -> list[str]:
    """The lines of a result whose last character the prompt did not force."""
    return [line for i, line in enumerate(result.lines) if len(prompt) < sum(len(x) for x in result.lines[:i + 1])]


@pytest.mark.parametrize("mode", ["greedy", "beam", "sample"])
def test_no_line_completes_a_known_line_unless_the_prompt_forces_it(tiny_checkpoint, mode):
    ckpt = load_checkpoint(tiny_checkpoint)
    prosody = prosody_for(ckpt.vocab)
    requests = [PoemRequest(prompt=p, form=f, mode=mode, seed=i).validate()
                for i, (p, f) in enumerate((p, f) for p in ("", "山", "月") for f in ("wujue", "qijue", "wulv"))]
    before = [generate_one(ckpt.model, ckpt.vocab, prosody, r) for r in requests]
    table = known_lines_from(line for r in before for line in r.lines)
    after = [generate_one(ckpt.model, ckpt.vocab, prosody, r, known_lines=table) for r in requests]
    lines = {line for r in before for line in r.lines}
    for request, result in zip(requests, after):
        assert not lines & set(free_lines(result, request.prompt)), result.poem
        assert all(len(line) == len(result.lines[0]) for line in result.lines)
    # Asked for, a known line is still written: the prompt forces the whole first line.
    first = before[0].lines[0]  # a 五绝's
    asked = generate_one(ckpt.model, ckpt.vocab, prosody, PoemRequest(prompt=first, form="wujue", mode=mode,
                                                                      seed=1).validate(), known_lines=table)
    assert asked.lines[0] == first


async def test_the_engine_bans_the_stores_table_and_follows_its_changes(checkpoint_store, tmp_path):
    requests = [PoemRequest(prompt=p, form=f, mode=m, seed=i).validate()
                for i, (p, f, m) in enumerate((p, f, m) for p in ("", "山") for f in ("wujue", "qilv")
                                              for m in ("greedy", "beam"))]
    async with LocalEngine(engine_settings(checkpoint_store, watch_interval=0.05)) as engine:
        status = await engine.status()
        assert (status["known_lines"], status["known_lines_error"]) == (0, None)
        before = await asyncio.gather(*(engine.generate(r) for r in requests))
        table = known_lines_from(line for r in before for line in r.lines)
        table.save(checkpoint_store / KNOWN_LINES_FILE)
        # The watcher loads it within a few intervals; status counts it at once, the models once the step loop
        # swaps their staged versions in (on a busy machine, a moment later).
        for _ in range(400):
            if all(m["known_lines"] for m in await engine.models()):
                break
            await asyncio.sleep(0.05)
        assert (await engine.status())["known_lines"] == len(table)
        assert all(m["known_lines"] == len(table) for m in await engine.models())
        after = await asyncio.gather(*(engine.generate(r) for r in requests))
        lines = {line for r in before for line in r.lines}
        for request, result in zip(requests, after):
            assert not lines & set(free_lines(result, request.prompt)), result.poem

        # A damaged table changes nothing: the previous one keeps serving, and status says why.
        (checkpoint_store / KNOWN_LINES_FILE).write_bytes(b"not a table")
        await engine.reload()
        status = await engine.status()
        assert status["known_lines"] == len(table) and "cannot read" in status["known_lines_error"]
        again = await asyncio.gather(*(engine.generate(r) for r in requests))
        assert [r.poem for r in again] == [r.poem for r in after]

        # Removed, it is gone: poems are as they were without it.
        (checkpoint_store / KNOWN_LINES_FILE).unlink()
        await engine.reload()
        assert (await engine.status())["known_lines"] == 0
        plain = await asyncio.gather(*(engine.generate(r) for r in requests))
        assert [r.poem for r in plain] == [r.poem for r in before]


async def test_requests_in_flight_when_the_table_changes_all_finish(checkpoint_store):
    requests = [PoemRequest(prompt="山", form="qilv", mode=("greedy", "beam", "sample")[i % 3], seed=i).validate()
                for i in range(24)]
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        tasks = [asyncio.create_task(engine.generate(r)) for r in requests]
        await asyncio.sleep(0)
        known_lines_from(["山中何处不风流"] * 3).save(checkpoint_store / KNOWN_LINES_FILE)
        await engine.reload()
        results = await asyncio.gather(*tasks)
        assert len(results) == 24 and all(len(r.lines) == 8 for r in results)
        assert (await engine.status())["requests"]["completed"] == 24


def test_the_corpus_lines_command_writes_the_table_once_per_corpus(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", make_poems(40, seed=3))
    store = tmp_path / "store"
    assert trainer_main(["corpus", "lines", "--corpus", str(corpus), "--store", str(store)]) == 0
    first = json.loads(capsys.readouterr().out)
    lines = {line for poem in load_corpus([corpus]).poems for line in poem.lines if len(line) >= MIN_LEN}
    assert first["written"] and first["lines"] == len(lines)
    table = KnownLines.load(store / KNOWN_LINES_FILE)
    assert table.meta["corpus_hash"] == load_corpus([corpus]).digest()
    assert trainer_main(["corpus", "lines", "--corpus", str(corpus), "--store", str(store)]) == 0
    assert json.loads(capsys.readouterr().out)["written"] is False  # the same corpus: nothing to do
    assert trainer_main(["corpus", "lines", "--corpus", str(corpus), "--store", str(store), "--force"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] is True
    # No corpus: a clear error, and the table already there stays.
    before = (store / KNOWN_LINES_FILE).read_bytes()
    assert trainer_main(["corpus", "lines", "--corpus", str(tmp_path / "nothing"), "--store", str(store)]) == 2
    assert "error" in capsys.readouterr().err
    assert (store / KNOWN_LINES_FILE).read_bytes() == before


def test_a_table_keyed_another_way_is_refused(tmp_path):
    from safetensors.numpy import save

    table = known_lines_from(["白日依山尽"])
    path = tmp_path / KNOWN_LINES_FILE
    path.write_bytes(save({"keys": table.keys, "lasts": table.lasts},
                          metadata={"format": "yinshi-known-lines-1", "hash": "min4-other"}))
    with pytest.raises(ValueError, match="keyed another way"):
        KnownLines.load(path)


def test_a_failed_reload_still_hands_the_new_table_to_the_models(checkpoint_store, monkeypatch):
    registry = ModelRegistry(checkpoint_store, ("lstm", "gru"), "cpu")
    registry.load_initial()
    known_lines_from(["山中何处不风流"]).save(checkpoint_store / KNOWN_LINES_FILE)

    def broken(name, force):
        raise RuntimeError("a reload that fails unexpectedly")

    monkeypatch.setattr(registry, "_reload_one", broken)
    with pytest.raises(RuntimeError):
        registry.reload()
    registry.apply_pending()
    assert not registry.known_lines_changed()
    assert all(registry.get(n).known_lines is not None for n in ("lstm", "gru"))


def test_a_new_table_reloads_no_model_so_a_refused_version_stays_refused(checkpoint_store):
    registry = ModelRegistry(checkpoint_store, ("lstm", "gru"), "cpu")
    registry.load_initial()
    (checkpoint_store / "gru" / "CURRENT").write_text("20990101T000000000Z\n")  # a version that is not there
    registry.reload("gru")
    failed = registry.num_failed_validations
    assert failed == 1 and "gru" in registry.refused()
    known_lines_from(["山中何处不风流"]).save(checkpoint_store / KNOWN_LINES_FILE)
    assert registry.reload_known_lines()
    registry.apply_pending()
    assert registry.num_failed_validations == failed
    assert registry.get("gru").known_lines is not None and registry.get("lstm").known_lines is not None
    assert not registry.reload_known_lines()  # nothing changed since


async def test_engine_known_lines_off_reads_no_table(checkpoint_store):
    assert EngineSettings.from_env({"ENGINE_KNOWN_LINES": "off"}).known_lines is False
    assert EngineSettings.from_env({"ENGINE_KNOWN_LINES": "on"}).known_lines is True
    with pytest.raises(ValueError, match="ENGINE_KNOWN_LINES must be on or off"):
        EngineSettings.from_env({"ENGINE_KNOWN_LINES": "yes"})
    request = PoemRequest(form="wujue", mode="greedy", seed=3).validate()
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        plain = await engine.generate(request)
    known_lines_from(plain.lines).save(checkpoint_store / KNOWN_LINES_FILE)
    async with LocalEngine(engine_settings(checkpoint_store, known_lines=False)) as engine:
        assert (await engine.status())["known_lines"] == 0
        assert (await engine.generate(request)).poem == plain.poem
    async with LocalEngine(engine_settings(checkpoint_store)) as engine:
        assert (await engine.status())["known_lines"] == len(plain.lines)
        assert (await engine.generate(request)).poem != plain.poem


def write_raw_table(path, keys, lasts):
    """A file with the table's format and hash but any contents (what a damaged or hostile store may hold)."""
    from safetensors.numpy import save

    from engine.poem.known_lines import FORMAT, HASH

    path.write_bytes(save({"keys": np.asarray(keys, np.int64), "lasts": np.asarray(lasts, np.int32)},
                          metadata={"format": FORMAT, "hash": HASH}))


@pytest.mark.parametrize("keys, lasts, reason", [
    ([1, 2], [ord("山"), 2 ** 28], "code point"),  # would size a lookup of 2²⁸ entries
    ([1, 2], [ord("山"), -1], "code point"),
    ([7] * 300, [ord("山")] * 300, "300 lines share one key"),  # a device lookup would read 300 wide
])
def test_a_table_whose_values_would_be_costly_or_wrong_is_refused(tmp_path, keys, lasts, reason):
    write_raw_table(tmp_path / "t", keys, lasts)
    with pytest.raises(ValueError, match=reason):
        KnownLines.load(tmp_path / "t")


def test_a_fifo_at_the_tables_path_is_refused_without_blocking(tmp_path):
    # A blocking open of a FIFO would hold the interpreter (and with it the engine's step loop) forever.
    import os
    import subprocess
    import sys

    fifo = tmp_path / KNOWN_LINES_FILE
    os.mkfifo(fifo)
    code = "import sys; from engine.poem.known_lines import KnownLines\ntry: KnownLines.load(sys.argv[1])\n" \
           "except ValueError as e: print(e)"
    done = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60,
                          check=True)
    assert "not a regular file" in done.stdout


def test_the_registry_keeps_its_table_when_the_file_turns_bad_or_unreadable(checkpoint_store):
    registry = ModelRegistry(checkpoint_store, ("lstm",), "cpu")
    path = checkpoint_store / KNOWN_LINES_FILE
    known_lines_from(["山中何处不风流", "白日依山尽"]).save(path)
    registry.load_initial()
    good = registry.known_lines
    assert len(good) == 2 and registry.known_lines_error is None

    write_raw_table(path, [1, 2], [ord("山"), 2 ** 28])
    assert not registry.reload_known_lines()
    assert registry.known_lines is good and "code point" in registry.known_lines_error
    assert registry.get("lstm").info()["known_lines"] == 2

    path.unlink()
    path.symlink_to(path.name)  # a loop: stat fails with ELOOP, which is not "the file is gone"
    assert not registry.reload_known_lines()
    assert registry.known_lines is good and "symbolic links" in registry.known_lines_error

    path.unlink()  # gone now: the ban goes with it
    assert registry.reload_known_lines()
    assert registry.known_lines is None and registry.known_lines_error is None


def test_a_replaced_table_is_freed_without_waiting_for_the_cycle_collector(tiny_checkpoint):
    import gc
    import weakref

    vocab = load_checkpoint(tiny_checkpoint).vocab
    table = known_lines_from(["白日依山尽"])
    per_vocab = table.for_vocab(vocab)
    assert per_vocab.num_lines == 1
    gone = weakref.ref(table)
    gc.disable()
    try:
        del table, per_vocab
        assert gone() is None
    finally:
        gc.enable()


def test_writing_the_table_removes_what_a_killed_writer_left_but_not_a_live_writers_file(tmp_path):
    import os
    import time

    from trainer.known_lines import STALE_SECONDS, refresh_known_lines

    corpus = write_corpus(tmp_path / "corpus", make_poems(40, seed=2))
    store = tmp_path / "store"
    store.mkdir()
    stale = store / f".{KNOWN_LINES_FILE}.killed.tmp"
    live = store / f".{KNOWN_LINES_FILE}.writing.tmp"
    for tmp in (stale, live):
        tmp.write_bytes(b"\0" * 1024)
    old = time.time() - STALE_SECONDS - 60
    os.utime(stale, (old, old))
    assert refresh_known_lines([str(corpus)], store)
    assert not stale.exists() and live.exists() and (store / KNOWN_LINES_FILE).is_file()
