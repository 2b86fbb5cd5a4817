"""The checkpoint store: publish, rollback, prune, keep K, refusing corrupt files, and SIGKILL mid-publish."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from engine.model import versions as store
from engine.model.checkpoint import load_checkpoint, save_checkpoint
from engine.model.network import ModelConfig, PoemModel
from engine.poem.vocab import Vocab

def make_checkpoint(path: Path, i: int, hidden_dim: int = 16) -> Path:
    """A small random-weight checkpoint with version V0000i (versions sort by i)."""
    torch.manual_seed(i)
    vocab = Vocab.build(["月山水花风云春秋天人"])
    model = PoemModel(ModelConfig(vocab_size=len(vocab), embed_dim=8, hidden_dim=hidden_dim, num_layers=1))
    save_checkpoint(path, model, vocab, meta={"version": f"2026010{i // 10}T00000000{i % 10}Z"}, half=False)
    return path


@pytest.fixture
def ckpts(tmp_path):
    return [make_checkpoint(tmp_path / f"c{i}.safetensors", i) for i in range(5)]


@pytest.fixture
def root(tmp_path):
    return tmp_path / "store"


def version_of(path: Path) -> str:
    return load_checkpoint(path).version


def test_publish_makes_the_checkpoint_current_and_loadable(root, ckpts):
    version = store.publish(root, "lstm", ckpts[0])
    assert version == version_of(ckpts[0])
    assert store.current_version(root, "lstm") == version
    assert load_checkpoint(store.current_path(root, "lstm")).version == version
    assert store.model_names(root) == ["lstm"]


def test_publish_keeps_only_the_newest_k_versions(root, ckpts):
    published = [store.publish(root, "lstm", c, keep=3) for c in ckpts]
    assert store.versions(root, "lstm") == published[-3:]
    assert store.current_version(root, "lstm") == published[-1]


def test_prune_never_deletes_the_current_version(root, ckpts):
    published = [store.publish(root, "lstm", c, keep=5) for c in ckpts[:3]]
    store.rollback(root, "lstm", published[0])
    store.prune(root, "lstm", keep=1)
    assert store.versions(root, "lstm") == [published[0], published[2]]
    assert store.current_version(root, "lstm") == published[0]


def test_rollback_without_a_version_goes_to_the_one_before_the_current(root, ckpts):
    published = [store.publish(root, "lstm", c) for c in ckpts[:3]]
    assert store.rollback(root, "lstm") == published[1]
    assert store.rollback(root, "lstm") == published[0]
    assert store.current_version(root, "lstm") == published[0]


def test_rollback_to_any_kept_version_and_forward_again(root, ckpts):
    published = [store.publish(root, "lstm", c) for c in ckpts[:3]]
    store.rollback(root, "lstm", published[0])
    assert store.current_version(root, "lstm") == published[0]
    store.rollback(root, "lstm", published[2])
    assert store.current_version(root, "lstm") == published[2]


@pytest.mark.parametrize("version", ["20000101T000000000Z", "../escape", ""])
def test_rollback_to_a_version_that_is_not_kept_is_refused_and_changes_nothing(root, ckpts, version):
    published = store.publish(root, "lstm", ckpts[0])
    with pytest.raises(store.StoreError):
        store.rollback(root, "lstm", version or None)  # "" → None: nothing older than the only version
    assert store.current_version(root, "lstm") == published


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _flip_weight_byte(p: Path):
    data = bytearray(p.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len + 20] ^= 0xFF  # inside the tensor data: the header still parses
    p.write_bytes(bytes(data))


def _garbage(p: Path):
    p.write_bytes(b"not a checkpoint at all" * 10)


def _delete(p: Path):
    p.unlink()


@pytest.mark.parametrize("damage", [_truncate, _flip_weight_byte, _garbage, _delete])
def test_publish_refuses_a_corrupt_checkpoint_and_changes_nothing(root, ckpts, damage):
    good = store.publish(root, "lstm", ckpts[0])
    damage(ckpts[1])
    with pytest.raises(store.StoreError):
        store.publish(root, "lstm", ckpts[1])
    assert store.current_version(root, "lstm") == good
    assert store.versions(root, "lstm") == [good]
    assert not list((root / "lstm" / "versions").glob(".*"))  # no temporary file left behind


def test_publishing_the_same_checkpoint_twice_changes_nothing(root, ckpts):
    v = store.publish(root, "lstm", ckpts[0])
    assert store.publish(root, "lstm", ckpts[0]) == v
    assert store.versions(root, "lstm") == [v]


def test_publish_refuses_other_weights_under_a_version_already_published(root, ckpts, tmp_path):
    v = store.publish(root, "lstm", ckpts[0])
    other = make_checkpoint(tmp_path / "other.safetensors", 0, hidden_dim=24)  # same version, other weights
    with pytest.raises(store.StoreError, match="different weights"):
        store.publish(root, "lstm", other)
    assert load_checkpoint(store.current_path(root, "lstm")).model.config.hidden_dim == 16
    assert store.current_version(root, "lstm") == v


def test_publish_removes_temporary_files_a_killed_publisher_left(root, ckpts):
    store.publish(root, "lstm", ckpts[0])
    (root / "lstm" / "versions" / ".20260101T000000009Z.abc.tmp").write_bytes(b"half a checkpoint")
    (root / "lstm" / ".CURRENT.xyz.tmp").write_bytes(b"2026")
    store.publish(root, "lstm", ckpts[1])
    assert not list((root / "lstm" / "versions").glob(".*.tmp"))
    assert not list((root / "lstm").glob(".CURRENT.*.tmp"))


@pytest.mark.parametrize("name", ["", "LSTM", "../x", "a" * 40])
def test_a_bad_model_name_is_refused(root, ckpts, name):
    with pytest.raises(store.StoreError, match="bad model name"):
        store.publish(root, name, ckpts[0])


def test_keep_below_one_is_refused(root, ckpts):
    with pytest.raises(store.StoreError, match="keep"):
        store.publish(root, "lstm", ckpts[0], keep=0)


def publish_forever(root: Path, work: Path, ready) -> None:
    """The child: publish fresh checkpoints (a few MB each) as fast as it can, until it is killed; `ready`
    is set once its first publish is done."""
    vocab = Vocab.build(["月山水花风云春秋天人"])
    model = PoemModel(ModelConfig(vocab_size=len(vocab), embed_dim=64, hidden_dim=256, num_layers=2))
    i = 0
    while True:
        with torch.no_grad():
            model.head.bias.add_(1.0)  # new weights every round
        src = work / f"src{i % 2}.safetensors"
        save_checkpoint(src, model, vocab, half=False)
        store.publish(root, "lstm", src, keep=3)
        ready.set()
        i += 1


def test_sigkill_while_publishing_always_leaves_current_naming_a_complete_version(root, ckpts, tmp_path):
    # Forked children start in milliseconds (torch is already imported), so many kills stay cheap.
    ctx = multiprocessing.get_context("fork")
    store.publish(root, "lstm", ckpts[0])
    rng = random.Random(7)
    parents = {version_of(c) for c in ckpts}  # what this process publishes; the children's versions differ
    for round_ in range(12):
        ready = ctx.Event()
        child = ctx.Process(target=publish_forever, args=(root, tmp_path, ready), daemon=True)
        child.start()
        try:
            assert ready.wait(120)  # it has published once: the kill lands in a live publishing loop
            time.sleep(rng.uniform(0.0, 0.6))  # somewhere in a later publish, or between two
            assert child.is_alive()  # still publishing, not crashed
            os.kill(child.pid, signal.SIGKILL)
            child.join(30)
        finally:
            child.kill()
        assert child.exitcode == -signal.SIGKILL
        current = store.current_path(root, "lstm")
        assert load_checkpoint(current).version == store.current_version(root, "lstm")
        for v in store.versions(root, "lstm"):  # every visible version is whole, not only the current
            load_checkpoint(store.version_path(root, "lstm", v))
        # The child published after this process's last publish, so CURRENT names one of its versions.
        assert store.current_version(root, "lstm") not in parents
        # The store keeps working after the kill: the next publish succeeds and sweeps the leftovers.
        store.publish(root, "lstm", ckpts[1 + round_ % 4], keep=3)
        assert not list((root / "lstm" / "versions").glob(".*.tmp"))


def test_the_command_line_publishes_rolls_back_and_lists_versions(root, ckpts, capsys):
    from trainer.__main__ import main

    assert main(["publish", "--store", str(root), "--name", "lstm", "--checkpoint", str(ckpts[0]), "--keep", "2"]) == 0
    assert main(["publish", "--store", str(root), "--name", "lstm", "--checkpoint", str(ckpts[1]), "--keep", "2"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out[-1]["version"] == version_of(ckpts[1])
    assert main(["rollback", "--store", str(root), "--name", "lstm"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == version_of(ckpts[0])
    assert main(["versions", "--store", str(root), "--name", "lstm", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["version"], r["current"]) for r in rows] == [(version_of(ckpts[0]), True), (version_of(ckpts[1]), False)]
    assert main(["rollback", "--store", str(root), "--name", "lstm", "--version", "20000101T000000000Z"]) == 2
    assert "no published version" in capsys.readouterr().err
    records = [json.loads(line) for line in (root / ".trainer" / "runs.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["publish", "publish", "rollback"]


def test_a_checkpoint_replaced_while_it_is_published_is_refused_and_changes_nothing(root, ckpts, monkeypatch):
    """The version is read from the header before the copy: a trainer saving a new best in between put
    other weights under the old version's name, and the engine reloaded that file on every poll."""
    v0 = store.publish(root, "lstm", ckpts[0])
    source = ckpts[1].parent / "best.safetensors"
    shutil.copy(ckpts[1], source)
    read_meta = store.read_meta

    def read_then_the_trainer_saves(path):
        meta = read_meta(path)
        if Path(path) == source:
            shutil.copy(ckpts[2], source)  # atomically, as save_checkpoint does: a whole other checkpoint
        return meta

    monkeypatch.setattr(store, "read_meta", read_then_the_trainer_saves)
    with pytest.raises(store.StoreError, match="changed while being copied"):
        store.publish(root, "lstm", source)
    assert store.current_version(root, "lstm") == v0 and store.versions(root, "lstm") == [v0]
    assert not list((root / "lstm" / "versions").glob(".*.tmp"))


@pytest.mark.parametrize("command", ["rollback", "versions", "publish"])
def test_every_store_command_refuses_a_bad_model_name_with_one_error_line(root, ckpts, capsys, command):
    from trainer.__main__ import main

    extra = ["--checkpoint", str(ckpts[0])] if command == "publish" else []
    assert main([command, "--store", str(root), "--name", "../x", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (root / "lstm").exists() and not (root.parent / "x").exists()


def test_a_publish_expecting_a_current_that_moved_is_superseded_and_changes_nothing(root, ckpts):
    # A retrain fine-tuned from v0; meanwhile an operator published v1 by hand. The retrain's publish must
    # not overwrite the operator's choice (last writer wins was the bug).
    v0 = store.publish(root, "lstm", ckpts[0])
    v1 = store.publish(root, "lstm", ckpts[1])
    with pytest.raises(store.Superseded, match=v1):
        store.publish(root, "lstm", ckpts[2], expect=v0)
    assert store.current_version(root, "lstm") == v1
    assert store.versions(root, "lstm") == [v0, v1]
    # The expected CURRENT still there: the publish goes through; None expects an empty store.
    assert store.publish(root, "lstm", ckpts[2], expect=v1) == version_of(ckpts[2])
    with pytest.raises(store.Superseded):
        store.publish(root / "other", "lstm", ckpts[0], expect=v0)
    assert store.publish(root / "other", "lstm", ckpts[0], expect=None) == v0


def test_a_rollback_is_recorded_with_current_and_a_publish_or_set_current_clears_it(root, ckpts):
    v0, v1 = (store.publish(root, "lstm", c) for c in ckpts[:2])
    assert store.current_state(root, "lstm") == (v1, False)
    store.rollback(root, "lstm")
    assert store.current_state(root, "lstm") == (v0, True)
    assert store.current_version(root, "lstm") == v0
    store.set_current(root, "lstm", v1)
    assert store.current_state(root, "lstm") == (v1, False)
    store.rollback(root, "lstm", v0)
    store.publish(root, "lstm", ckpts[2])
    assert store.current_state(root, "lstm") == (version_of(ckpts[2]), False)


def test_the_gate_verdict_is_stored_beside_the_version_before_current_moves_and_pruned_with_it(root, ckpts):
    verdict = {"candidate_ppl": 90.0, "serving_ppl": 95.0}
    v0 = store.publish(root, "lstm", ckpts[0], gate=verdict)
    gate = store.gate_record(root, "lstm", v0)
    assert gate["candidate_ppl"] == 90.0 and gate["passed"] is True
    assert gate["weights_sha256"] == load_checkpoint(store.current_path(root, "lstm")).meta["weights_sha256"]
    v1 = store.publish(root, "lstm", ckpts[1])  # by hand: no gate verdict
    assert store.gate_record(root, "lstm", v1) is None
    store.publish(root, "lstm", ckpts[2], keep=1)
    assert store.gate_record(root, "lstm", v0) is None
    assert sorted(p.name for p in (root / "lstm" / "versions").iterdir()) == [f"{version_of(ckpts[2])}.safetensors"]


def damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # a byte of the weights: the header still reads, the SHA-256 no longer matches
    path.write_bytes(bytes(data))


def test_a_rollback_to_a_version_that_no_longer_loads_is_refused_and_current_stays(root, ckpts):
    first, second = (store.publish(root, "lstm", c) for c in ckpts[:2])
    damage(store.version_path(root, "lstm", first))
    with pytest.raises(store.StoreError, match="does not load"):
        store.rollback(root, "lstm")
    with pytest.raises(store.StoreError, match="does not load"):
        store.set_current(root, "lstm", first)
    assert store.current_state(root, "lstm") == (second, False)


def test_publishing_a_good_source_again_repairs_a_damaged_copy_in_the_store(root, ckpts):
    version = store.publish(root, "lstm", ckpts[0])
    damage(store.version_path(root, "lstm", version))
    assert store.publish(root, "lstm", ckpts[0]) == version
    assert load_checkpoint(store.current_path(root, "lstm")).version == version  # loads: the copy was replaced


def test_a_rollback_in_a_mistyped_store_or_model_is_refused_and_makes_no_directory(root, ckpts, tmp_path):
    store.publish(root, "lstm", ckpts[0])
    for where, name in ((tmp_path / "stor", "lstm"), (root, "lstm-larg")):
        with pytest.raises(store.StoreError, match="no such model"):
            store.rollback(where, name)
        assert not (where / name).exists()
