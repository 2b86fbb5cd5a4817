"""One retrain run on a tiny synthetic corpus: publish, skip, fine-tune, refuse a worse model, records."""

from __future__ import annotations

import contextlib
import os
import random
import time
import shutil
from pathlib import Path

import pytest
from conftest import make_poems, write_corpus

from engine.model import versions as store
from engine.model.checkpoint import load_checkpoint
from engine.poem.known_lines import KNOWN_LINES_FILE, KnownLines
from engine.poem.forms import FORMS, format_poem
from trainer import retrain as rt
from trainer import spool
from trainer.corpus import load_corpus
from trainer.retrain import RetrainConfig, read_run_records, retrain

TINY = dict(embed_dim=16, hidden_dim=32, num_layers=1, dropout=0.0, eval_every=30, eval_poems=40,
            batch_tokens=512, min_count=1, warmup_steps=5, lr=1e-2, threads=1, half=False)
NEW_CHARS = "甲乙丙丁戊己庚辛壬癸子丑寅卯辰巳午未申酉戌亥"  # not in the fixture's characters


def tiny_config(root: Path, corpus: Path, **overrides) -> RetrainConfig:
    cfg = RetrainConfig(store=str(root / "store"), corpus=[str(corpus)], names=("lstm",), work=str(root / "work"), time_budget=0,
                        max_steps=30, base="", tolerance=0.05, finetune_lr=3e-3, form_check_poems=1,
                        code_version="test", train=dict(TINY))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def fake_poem(ckpt, form, seed):
    """A well-formed poem without the decoder, so these tests are about the run, not about decoding."""
    f = FORMS[form]
    return format_poem(["月" * f.line_len] * f.num_lines)


@pytest.fixture
def fake_decoder(monkeypatch):
    monkeypatch.setattr(rt, "_generate", fake_poem)


@pytest.fixture(scope="module")
def published_v1(tmp_path_factory):
    """A store where one retrain run has published v1 on a 400-poem corpus (copied per test)."""
    root = tmp_path_factory.mktemp("v1")
    corpus = write_corpus(root / "corpus", make_poems(400, seed=1))
    mp = pytest.MonkeyPatch()
    mp.setattr(rt, "_generate", fake_poem)
    try:
        record = retrain(tiny_config(root, corpus, max_steps=60), reason="test")
    finally:
        mp.undo()
    return root, record


@pytest.fixture
def v1(published_v1, tmp_path):
    root, record = published_v1
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    return tmp_path, record


def add_poems(corpus: Path, poems: list[str]):
    """Grow the corpus by one more upstream-style file (the existing files stay as they are)."""
    extra = write_corpus(corpus.parent / "extra", poems, per_file=len(poems))
    n = len(list((corpus / "全唐诗").glob("*.json")))
    (extra / "全唐诗" / "poet.tang.0.json").rename(corpus / "全唐诗" / f"poet.tang.{100000 + n}.json")
    shutil.rmtree(extra)


def test_a_first_run_publishes_v1_on_the_tiny_corpus(v1):
    root, record = v1
    assert record["outcome"] == "published", record
    assert record["mode"] == "scratch"
    cfg = tiny_config(root, root / "corpus")
    assert store.current_version(cfg.store, "lstm") == record["version"]
    assert load_checkpoint(store.current_path(cfg.store, "lstm")).meta["corpus_hash"] == record["corpus_hash"]


def test_an_unchanged_corpus_is_skipped(v1, fake_decoder):
    root, first = v1
    record = retrain(tiny_config(root, root / "corpus"))
    assert record["outcome"] == "skipped"
    assert "unchanged" in record["why"]
    assert store.versions(tiny_config(root, root / "corpus").store, "lstm") == [first["version"]]


def test_a_forced_run_trains_even_when_nothing_changed(v1, fake_decoder):
    root, _ = v1
    record = retrain(tiny_config(root, root / "corpus", max_steps=10), force=True)
    assert record["outcome"] in ("published", "rejected")
    assert record["train"]["step"] == 10


def test_changed_code_is_not_skipped(v1, fake_decoder):
    root, _ = v1
    record = retrain(tiny_config(root, root / "corpus", max_steps=10, code_version="test-2"))
    assert record["outcome"] != "skipped"


def test_a_changed_corpus_fine_tunes_the_serving_model_and_publishes_v2(v1, fake_decoder):
    root, first = v1
    add_poems(root / "corpus", make_poems(80, seed=2))
    cfg = tiny_config(root, root / "corpus")
    record = retrain(cfg)
    assert record["outcome"] == "published", record
    assert record["mode"] == "finetune"
    assert record["serving_version"] == first["version"]
    assert record["corpus_hash"] != first["corpus_hash"]
    assert record["metrics"]["candidate"]["ppl"] <= record["metrics"]["serving"]["ppl"] * 1.05
    assert store.current_version(cfg.store, "lstm") == record["version"] != first["version"]
    assert store.versions(cfg.store, "lstm") == [first["version"], record["version"]]


def test_a_retrain_keeps_the_serving_models_input_dropout(v1, fake_decoder, tmp_path):
    import dataclasses
    import json

    from engine.model.checkpoint import save_checkpoint
    from engine.model.network import PoemModel

    root, _ = v1
    cfg = tiny_config(root, root / "corpus", max_steps=5)
    serving = load_checkpoint(store.current_path(cfg.store, "lstm"))
    model = PoemModel(dataclasses.replace(serving.model.config, input_dropout=0.2))
    model.load_state_dict(serving.model.state_dict())
    time.sleep(0.002)  # a new version (its own timestamp)
    keep = {k: serving.meta[k] for k in ("metrics", "corpus_hash", "train") if k in serving.meta}
    save_checkpoint(tmp_path / "regularised.safetensors", model, serving.vocab, keep)
    store.publish(cfg.store, "lstm", tmp_path / "regularised.safetensors")
    retrain(cfg, force=True)
    [state] = Path(cfg.work).glob("lstm/*-*/state.json")
    assert json.loads(state.read_text())["config"]["input_dropout"] == 0.2


def test_new_characters_in_the_corpus_train_from_scratch(v1, fake_decoder):
    root, _ = v1
    rng = random.Random(0)
    add_poems(root / "corpus", [format_poem(["".join(rng.choice(NEW_CHARS) for _ in range(5)) for _ in range(4)])
                                for _ in range(20)])
    record = retrain(tiny_config(root, root / "corpus", max_steps=10))
    assert record["mode"] == "scratch", record.get("vocab_coverage")
    assert record["vocab_coverage"]["serving"] < record["vocab_coverage"]["fresh"] == 1.0
    candidate = load_checkpoint(Path(record_run_dir(root)) / "best.safetensors")
    assert all(ch in candidate.vocab for ch in NEW_CHARS)


def record_run_dir(root: Path) -> Path:
    (run_dir,) = (root / "work" / "lstm").iterdir()
    return run_dir


def test_a_worse_model_is_not_published(v1, fake_decoder):
    root, first = v1
    add_poems(root / "corpus", make_poems(80, seed=4))
    # Two steps from scratch cannot match 60 steps of training: the candidate must be refused.
    record = retrain(tiny_config(root, root / "corpus", max_steps=2, base="", vocab_tolerance=-1.0))
    assert record["mode"] == "scratch"
    assert record["outcome"] == "rejected", record
    assert "worse than the serving" in record["why"]
    cfg = tiny_config(root, root / "corpus")
    assert store.current_version(cfg.store, "lstm") == first["version"]
    assert store.versions(cfg.store, "lstm") == [first["version"]]


def test_a_rejected_run_is_not_repeated_on_the_same_corpus(v1, fake_decoder):
    root, _ = v1
    add_poems(root / "corpus", make_poems(80, seed=4))
    retrain(tiny_config(root, root / "corpus", max_steps=2, vocab_tolerance=-1.0))
    assert retrain(tiny_config(root, root / "corpus"))["outcome"] == "skipped"


def test_a_model_failing_the_form_check_is_not_published(v1, monkeypatch):
    root, first = v1
    monkeypatch.setattr(rt, "_generate", lambda ckpt, form, seed: "月月月，月月月。")
    record = retrain(tiny_config(root, root / "corpus", max_steps=10), force=True)
    assert record["outcome"] == "rejected"
    assert "form check failed" in record["why"]
    assert store.current_version(tiny_config(root, root / "corpus").store, "lstm") == first["version"]


def test_every_run_leaves_a_record(v1, fake_decoder):
    root, first = v1
    cfg = tiny_config(root, root / "corpus")
    retrain(cfg)  # skipped
    retrain(tiny_config(root, root / "missing-corpus"))  # failed: no corpus
    records = read_run_records(cfg.store, "lstm")
    assert [r["outcome"] for r in records] == ["published", "skipped", "failed"]
    for r in records:
        assert r["kind"] == "retrain" and r["at"] and r["reason"] and "seconds" in r
    assert records[0]["metrics"]["candidate"]["ppl"] > 0 and records[0]["form_check"]["ok"]
    assert "no such file or directory" in records[2]["why"]


def test_a_second_run_while_one_holds_the_run_lock_is_busy(v1, fake_decoder):
    root, _ = v1
    cfg = tiny_config(root, root / "corpus")
    with rt._run_lock(cfg.store) as locked:
        assert locked
        record = retrain(cfg, force=True)
    assert record["outcome"] == "busy"
    assert read_run_records(cfg.store)[-1]["outcome"] == "busy"


def test_an_interrupted_run_resumes_from_its_run_directory(v1, fake_decoder):
    root, _ = v1
    add_poems(root / "corpus", make_poems(80, seed=5))
    cfg = tiny_config(root, root / "corpus", max_steps=20)
    from trainer.train import Trainer

    # Stand-in for a run killed half-way: a run directory whose state says "not done" at step 10.
    real_run = Trainer.run
    calls = []

    def run_then_die(self, progress_bar=True):
        calls.append(self.progress["step"])
        if len(calls) == 1:
            self.cfg.max_steps = 10
            real_run(self, progress_bar)
            self.progress["done"] = False
            self.save_state()
            raise KeyboardInterrupt  # not an Exception: escapes retrain() like a kill would
        return real_run(self, progress_bar)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "run", run_then_die)
        with pytest.raises(KeyboardInterrupt):
            retrain(cfg)
        record = retrain(cfg)
    assert record["resumed"] is True
    assert calls == [0, 10]
    assert record["train"]["step"] == 20


def test_a_run_stopped_after_training_but_before_its_outcome_is_evaluated_not_trained_again(v1, monkeypatch):
    """A stop while evaluating or publishing deleted the finished run and spent the whole budget again."""
    root, _ = v1
    add_poems(root / "corpus", make_poems(80, seed=5))
    cfg = tiny_config(root, root / "corpus", max_steps=20)
    from trainer.train import Trainer

    def stopped_in_the_form_check(ckpt, form, seed):
        raise KeyboardInterrupt  # not an Exception: escapes retrain() like a kill would

    monkeypatch.setattr(rt, "_generate", stopped_in_the_form_check)
    with pytest.raises(KeyboardInterrupt):
        retrain(cfg)
    monkeypatch.setattr(rt, "_generate", fake_poem)
    monkeypatch.setattr(Trainer, "run", lambda self, progress_bar=True: pytest.fail("trained again"))
    record = retrain(cfg)
    assert record["outcome"] == "published" and record["resumed"] is True and record["train"]["step"] == 20
    # A forced run still starts over.
    monkeypatch.undo()
    monkeypatch.setattr(rt, "_generate", fake_poem)
    assert retrain(cfg, force=True)["resumed"] is False


def test_a_run_that_trained_and_then_failed_is_trained_again_not_failed_again(v1, monkeypatch):
    """Its outcome is on record, so its finished run directory is not evaluated again as a stopped one."""
    root, _ = v1
    add_poems(root / "corpus", make_poems(80, seed=5))
    cfg = tiny_config(root, root / "corpus", max_steps=20)

    def full_disk(*args, **kwargs):
        raise store.StoreError("lstm: cannot publish: No space left on device")

    monkeypatch.setattr(rt, "_generate", fake_poem)
    with monkeypatch.context() as m:
        m.setattr(store, "publish", full_disk)
        assert retrain(cfg)["outcome"] == "failed"
    again = retrain(cfg)
    assert again["outcome"] == "published" and again["resumed"] is False


def test_the_form_check_passes_for_a_trained_model_with_the_real_decoder(v1):
    root, _ = v1
    ckpt = load_checkpoint(store.current_path(tiny_config(root, root / "corpus").store, "lstm"))
    check = rt.form_check(ckpt, per_form=1)
    assert check["ok"], check["failures"]
    assert len(check["poems"]) == len(FORMS)


def test_the_summary_reads_as_one_line():
    record = {"outcome": "published", "version": "V2", "why": "x",
              "metrics": {"candidate": {"ppl": 90.0}, "serving": {"ppl": 95.5}}}
    assert spool.summary(record) == "published V2, ppl 95.50 → 90.00"
    assert spool.summary({"outcome": "skipped", "why": "unchanged"}) == "skipped, unchanged"


def _during_training(action):
    """Trainer.run that does `action()` (a hand publish, a rollback) while the run trains."""
    from trainer.train import Trainer

    real_run = Trainer.run

    def run(self, progress_bar=True):
        action()
        return real_run(self, progress_bar)
    return pytest.MonkeyPatch.context(), Trainer, run


def _new_version_of(path: Path, dst: Path) -> Path:
    import time as _time

    from engine.model.checkpoint import save_checkpoint

    _time.sleep(0.002)  # versions have millisecond resolution
    ckpt = load_checkpoint(path)
    save_checkpoint(dst, ckpt.model, ckpt.vocab, {k: ckpt.meta[k] for k in ("metrics", "corpus_hash", "train")})
    return dst


@pytest.mark.parametrize("operator", ["publish", "rollback"])
def test_a_run_whose_start_point_moved_while_it_trained_is_superseded(v1, fake_decoder, tmp_path, operator):
    from trainer.__main__ import main

    root, first = v1
    add_poems(root / "corpus", make_poems(80, seed=2))
    cfg = tiny_config(root, root / "corpus")
    cur = store.current_path(cfg.store, "lstm")
    hand = _new_version_of(cur, tmp_path / "hand.safetensors")
    if operator == "rollback":  # the run starts from a hand-published v2 and the operator goes back to v1
        assert main(["publish", "--store", cfg.store, "--name", "lstm", "--checkpoint", str(hand)]) == 0
        args = ["rollback", "--store", cfg.store, "--name", "lstm"]
    else:
        args = ["publish", "--store", cfg.store, "--name", "lstm", "--checkpoint", str(hand)]
    start = store.current_version(cfg.store, "lstm")
    ctx, Trainer, run = _during_training(lambda: main(args))
    with ctx as mp:
        mp.setattr(Trainer, "run", run)
        record = retrain(cfg)
    chosen = store.current_version(cfg.store, "lstm")
    assert chosen != start  # the operator moved CURRENT during the run …
    assert record["outcome"] == "superseded", record  # … so the run does not overwrite it
    assert record["serving_version"] == start and chosen in record["why"]
    assert "version" not in record and len(store.versions(cfg.store, "lstm")) == 2
    # Not a trained outcome: the next run trains again, from what serves now.
    again = retrain(cfg)
    assert again["outcome"] == "published" and again["serving_version"] == chosen


def test_a_published_run_stores_its_gate_verdict_for_the_engine(v1, fake_decoder):
    root, first = v1
    add_poems(root / "corpus", make_poems(80, seed=2))
    cfg = tiny_config(root, root / "corpus")
    record = retrain(cfg)
    assert record["outcome"] == "published", record
    gate = store.gate_record(cfg.store, "lstm", record["version"])
    assert gate["passed"] is True
    assert gate["candidate_ppl"] == record["metrics"]["candidate"]["ppl"]
    assert gate["serving_ppl"] == record["metrics"]["serving"]["ppl"]
    assert gate["serving_version"] == first["version"]


def test_a_ci_model_retrains_on_the_ci_and_stays_a_ci_model(tmp_path, tiny_ci_corpus, tiny_ci_checkpoint, fake_decoder):
    cfg = tiny_config(tmp_path, tiny_ci_corpus, names=("ci",), name="ci", max_steps=10)
    store.publish(cfg.store, "ci", tiny_ci_checkpoint)
    record = retrain(cfg, reason="test")
    assert record["mode"] == "finetune" and record["outcome"] in ("published", "rejected"), record
    run = next((Path(cfg.work) / "ci").iterdir())
    candidate = load_checkpoint(run / "best.safetensors")
    assert candidate.meta["train"]["kind"] == "ci" and candidate.vocab.writes_ci
    # Its held-out poems were 词: the perplexity was measured on them, not on the regular poems beside them.
    assert candidate.meta["train"]["train_poems"] < 300


def test_a_model_that_writes_shi_and_ci_retrains_on_both(tmp_path, tiny_ci_corpus, fake_decoder):
    from trainer.pack import pack_corpus
    from trainer.train import Trainer, TrainConfig

    pack = tmp_path / "packed.safetensors"
    pack_corpus([str(tiny_ci_corpus)], pack, min_count=1, include_ci=True)
    Trainer(TrainConfig(packed=str(pack), out=str(tmp_path / "both"), max_steps=5, eval_every=5, eval_poems=20,
                        **{k: v for k, v in TINY.items() if k not in ("eval_every", "eval_poems")}),
            log=lambda m: None).run(progress_bar=False)
    cfg = tiny_config(tmp_path, tiny_ci_corpus, max_steps=10)
    store.publish(cfg.store, "lstm", tmp_path / "both" / "best.safetensors")
    record = retrain(cfg, reason="test")
    assert record["mode"] == "finetune" and record["trains_on"] == "诗 and 词", record
    candidate = load_checkpoint(next((Path(cfg.work) / "lstm").iterdir()) / "best.safetensors")
    assert candidate.meta["train"]["kind"] == "all" and candidate.vocab.writes_ci
    assert candidate.meta["train"]["train_poems"] > 300  # the 词 and the regular poems beside them


def test_without_ci_in_the_corpus_the_ci_run_fails_saying_how_and_the_others_still_retrain(v1, fake_decoder):
    root, _ = v1
    cfg = tiny_config(root, root / "corpus", names=("lstm", "ci"), max_steps=5)
    records = rt.retrain_all(cfg, force=True, reason="test")
    assert [r["name"] for r in records] == ["lstm", "ci"]
    # The run brought the store's known-lines table up to date with the corpus first.
    assert KnownLines.load(root / "store" / KNOWN_LINES_FILE).meta["corpus_hash"] == load_corpus([root / "corpus"], include_ci=True).digest()
    assert records[0]["outcome"] in ("published", "rejected")
    assert records[1]["outcome"] == "failed" and "--include-ci" in records[1]["why"]


def _sleeping_torchrun(monkeypatch):
    """torchrun replaced by a process that only sleeps: what matters here is its lifetime, not training."""
    import trainer.retrain as retrain

    monkeypatch.setattr(retrain, "torchrun_command", lambda tc, nproc, port: ["sleep", "60"])
    return retrain


def _wait_for(condition, what: str, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_stopping_the_daemon_stops_the_torchrun_of_the_run_in_progress(tmp_path, monkeypatch):
    import threading

    from trainer.train import TrainConfig

    retrain = _sleeping_torchrun(monkeypatch)
    outcome = {}

    def run():
        with retrain._run_lock(tmp_path / "store"):
            try:
                retrain._train_distributed(TrainConfig(out=str(tmp_path / "run")), 2)
            except RuntimeError as e:
                outcome["error"] = str(e)

    worker = threading.Thread(target=run)
    worker.start()
    _wait_for(lambda: retrain._training, "torchrun never started")
    (proc,) = retrain._training
    retrain.stop_training()  # what the daemon calls on its way out
    worker.join(timeout=20)
    assert not worker.is_alive() and proc.poll() is not None and "exited with status" in outcome["error"]
    with retrain._run_lock(tmp_path / "store") as locked:
        assert locked


def test_a_torchrun_orphaned_by_a_killed_trainer_keeps_the_run_lock_until_it_ends(tmp_path):
    """The trainer killed outright (SIGKILL, an OOM kill): its torchrun lives on, and a new run must not
    start beside it in the same run directory."""
    import signal
    import subprocess
    import sys

    from trainer.retrain import _run_lock

    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
import trainer.retrain as retrain
from trainer.train import TrainConfig
retrain.torchrun_command = lambda tc, nproc, port: ["sleep", "60"]
with retrain._run_lock({str(tmp_path / "store")!r}):
    retrain._train_distributed(TrainConfig(out={str(tmp_path / "run")!r}), 2)
"""
    trainer = subprocess.Popen([sys.executable, "-c", script])
    children = []

    def torchrun_started():
        children[:] = subprocess.run(["pgrep", "-P", str(trainer.pid)], capture_output=True, text=True).stdout.split()
        return children

    try:
        _wait_for(torchrun_started, "torchrun never started")
        trainer.kill()
        trainer.wait()
        orphan = int(children[0])
        assert os.path.exists(f"/proc/{orphan}")
        with _run_lock(tmp_path / "store") as locked:
            assert not locked  # busy: the orphan holds the lock
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid), signal.SIGKILL)
    _wait_for(lambda: not os.path.exists(f"/proc/{orphan}") or open(f"/proc/{orphan}/stat").read().split()[2] == "Z",
              "the orphan did not end")
    with _run_lock(tmp_path / "store") as locked:
        assert locked


@pytest.mark.parametrize("env, overrides, named", [
    ({"RETRAIN_TIME_BUDGET": "0"}, {}, "RETRAIN_TIME_BUDGET"),  # no limit at all: a run for hours
    ({"RETRAIN_TIME_BUDGET": "nan"}, {}, "RETRAIN_TIME_BUDGET"),
    ({"RETRAIN_TIME_BUDGET": "inf"}, {}, "RETRAIN_TIME_BUDGET"),
    ({"RETRAIN_TIME_BUDGET": "-1"}, {}, "RETRAIN_TIME_BUDGET"),
    ({}, {"tolerance": float("nan")}, "tolerance"),  # the quality gate off
    ({}, {"tolerance": float("inf")}, "tolerance"),
    ({}, {"keep": 0}, "keep"),  # failed only at publish, after the whole run
    ({}, {"max_steps": -5}, "max-steps"),
    ({"ENGINE_MODELS": "Lstm"}, {}, "ENGINE_MODELS"),  # was a StoreError traceback
])
def test_settings_that_would_unbound_a_run_or_switch_off_its_gate_are_refused(env, overrides, named):
    with pytest.raises(ValueError, match=named):
        RetrainConfig.from_env(env, **overrides)


def test_a_time_budget_of_zero_is_allowed_where_a_step_count_bounds_the_run():
    assert RetrainConfig.from_env({"RETRAIN_TIME_BUDGET": "0"}, max_steps=10).time_budget == 0


def test_a_serving_version_that_does_not_load_stops_the_run_before_anything_is_published(v1, fake_decoder):
    """It trained from scratch, compared with nothing, and published a "passed" verdict the engine trusted."""
    root, record = v1
    path = store.version_path(root / "store", "lstm", record["version"])
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one damaged byte in the weights
    path.write_bytes(bytes(data))
    again = retrain(tiny_config(root, root / "corpus"), force=True, reason="test")
    assert again["outcome"] == "failed" and "does not load" in again["why"] and "roll back" in again["why"]
    assert store.current_version(root / "store", "lstm") == record["version"]
    assert store.versions(root / "store", "lstm") == [record["version"]]


def test_a_record_after_a_torn_line_starts_on_its_own_line_and_is_read_back(tmp_path):
    rt.append_record(tmp_path, {"name": "lstm", "outcome": "published", "n": 1})
    with open(rt.records_path(tmp_path), "ab") as f:
        f.write(b'{"kind": "retrain", "name": "lstm", "out')  # a kill or a full disk mid-write
    rt.append_record(tmp_path, {"name": "lstm", "outcome": "published", "n": 3})
    assert [r["n"] for r in read_run_records(tmp_path, "lstm")] == [1, 3]


def test_a_fresh_vocabulary_is_gated_on_the_poems_the_serving_model_can_read_too(v1, fake_decoder):
    """The serving model skips characters it lacks: compared on all poems, the two scores covered different text."""
    root, _ = v1
    rng = random.Random(0)
    add_poems(root / "corpus", [format_poem(["".join(rng.choice(NEW_CHARS) for _ in range(5)) for _ in range(4)])
                                for _ in range(60)])
    record = retrain(tiny_config(root, root / "corpus", max_steps=10, eval_poems=4000))
    assert record["mode"] == "scratch"
    metrics = record["metrics"]
    assert metrics["candidate"]["chars"] > metrics["candidate_common"]["chars"] == metrics["serving"]["chars"]
    assert metrics["serving"]["oov"] == 0
