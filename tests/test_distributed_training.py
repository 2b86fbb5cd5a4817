"""Data-parallel training for real: two processes under torchrun (gloo over 127.0.0.1) against one process with
the same global batch, and a two-process run killed with SIGKILL and resumed.

Tolerance. Both sides do the same arithmetic except the reduction order: the two ranks' gradients are summed
by gloo instead of inside one backward pass, so the first step already differs by about one float32 ulp and
Adam carries that on. Measured on this fixture (40 steps, one thread): the train losses differ by at most
2e-7 relative (5.5e-7 after 200 steps; the weights by 1.6e-5 after 200). `rtol=1e-5` leaves 50x headroom,
while the mistake it guards against, averaging each rank's per-token mean although the shares are uneven
(19 rows cut 10 + 9), already differs by 1.4e-3 within 10 steps.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from trainer.train import TrainConfig, Trainer, read_progress

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
# A constant learning rate after the warm-up (--min-lr-ratio 1), so the run killed below (given far more
# steps than it will ever take) follows the same schedule as the STEPS-step run it is compared with.
TINY = dict(embed_dim=16, hidden_dim=32, num_layers=1, dropout=0.0, eval_poems=20, min_count=1, threads=1,
            half=False, warmup_steps=3, min_lr_ratio=1.0, epochs=100, eval_every=100000, log_every=1)
PER_RANK = dict(batch_tokens=256, lr=0.01)  # two ranks: a global batch of 512 tokens at lr 0.02


def _flags(**kw) -> list[str]:
    out = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        out += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return out


def _torchrun(corpus: Path, out: Path, *extra: str, **kw) -> subprocess.Popen:
    # A new session, so a SIGKILL reaches torchrun's agent and both workers at once.
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on loopback only, whatever the host's interfaces
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "trainer", "train", "--corpus", str(corpus), "--out", str(out),
           "--no-progress", *_flags(**(TINY | PER_RANK | kw)), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, out  # rank 0 alone prints the result
    return {"result": json.loads(lines[0]), "stderr": err}


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train_loss" in r]
    assert len(steps) == len(set(steps))  # one writer: no step twice
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


@pytest.fixture(scope="module")
def two_ranks(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "two"
    done = _finish(_torchrun(tiny_corpus, out, max_steps=STEPS))
    assert done["result"]["step"] == STEPS and done["result"]["stop_reason"] == "max_steps"
    return out


def test_two_ranks_train_as_one_process_with_the_doubled_batch_and_learning_rate(two_ranks, tiny_corpus, tmp_path):
    one = tmp_path / "one"
    cfg = TrainConfig(corpus=[str(tiny_corpus)], out=str(one), max_steps=STEPS, batch_tokens=512, lr=0.02, **TINY)
    Trainer(cfg, log=lambda m: None).run(progress_bar=False)

    a, b = _losses(one), _losses(two_ranks)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    pa, pb = read_progress(one), read_progress(two_ranks)
    assert pb["world_size"] == 2 and pa["world_size"] == 1
    assert pa["tokens"] == pb["tokens"]  # the same global batches: every token counted once, on one rank
    assert pb["best_val_ppl"] == pytest.approx(pa["best_val_ppl"], rel=1e-4)  # rank 0's evaluation
    ckpt = load_file(str(two_ranks / "best.safetensors"))
    assert ckpt and not any(k.startswith("module.") for k in ckpt)  # the plain model, not the DDP wrapper


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def _children(ppid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == ppid:
                out.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return out


def _saved_step(run: Path) -> int:
    try:
        return (read_progress(run) or {}).get("step", 0)
    except ValueError:  # being written
        return 0


def test_a_two_rank_run_killed_with_sigkill_resumes_on_both_ranks_and_ends_as_the_unbroken_one(
        two_ranks, tiny_corpus, tmp_path):
    run = tmp_path / "run"
    proc = _torchrun(tiny_corpus, run, save_every=0, max_steps=100000)  # saves every step, never finishes
    deadline = time.monotonic() + 120
    while _saved_step(run) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    # torchrun starts each worker in a session of its own: signal the workers by pid, then the agent.
    workers = _children(proc.pid)
    assert len(workers) == 2
    for pid in [*workers, proc.pid]:
        os.kill(pid, signal.SIGSTOP)  # frozen, so the step read below is the last one saved
    saved = _saved_step(run)
    for pid in [*workers, proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    for pid in workers:  # reaped by init once the agent is gone; wait until they are
        while Path(f"/proc/{pid}").exists() and _state(pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.02)
    assert 5 <= saved < STEPS

    done = _finish(_torchrun(tiny_corpus, run, "--resume", max_steps=STEPS))
    assert f"resumed at step {saved} " in done["stderr"]
    assert done["result"]["step"] == STEPS
    a, b = load_file(str(run / "state.safetensors")), load_file(str(two_ranks / "state.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert _losses(run)[STEPS] == pytest.approx(_losses(two_ranks)[STEPS], rel=1e-5)


def test_retrain_nproc_2_trains_the_retrain_run_under_torchrun(tiny_corpus, tmp_path, monkeypatch):
    from engine.model import versions as store
    from engine.poem.forms import FORMS, format_poem
    from trainer import retrain as rt

    # A well-formed poem without the decoder: this test is about how the run trains, not about decoding.
    monkeypatch.setattr(rt, "_generate", lambda ckpt, form, seed: format_poem(
        ["月" * FORMS[form].line_len] * FORMS[form].num_lines))
    env = {"RETRAIN_NPROC": "2", "CHECKPOINT_DIR": str(tmp_path / "store"), "CORPUS_DIR": str(tiny_corpus),
           "ENGINE_MODELS": "lstm", "RETRAIN_WORK": str(tmp_path / "work")}
    cfg = rt.RetrainConfig.from_env(env, time_budget=0, max_steps=10, base="", code_version="test",
                                    form_check_poems=1, train=TINY | PER_RANK | {"eval_every": 10})
    assert cfg.nproc == 2 and rt.RetrainConfig.from_env({}).nproc == 1
    [record] = rt.retrain_all(cfg, reason="test")
    assert record["outcome"] == "published", record
    assert record["train"]["step"] == 10 and record["train"]["stop_reason"] == "max_steps"
    [run_dir] = (tmp_path / "work" / "lstm").iterdir()
    assert read_progress(run_dir)["world_size"] == 2  # trained by two ranks, not in the daemon's process
    assert store.current_version(cfg.store, "lstm") == record["version"]
    with pytest.raises(ValueError, match="RETRAIN_NPROC"):
        rt.RetrainConfig.from_env({"RETRAIN_NPROC": "0"})
