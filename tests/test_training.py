"""Training: batching without padding, a tiny run that learns, both recipes, resume after kill -9, `trainer eval`
and `trainer bench` output."""

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

from conftest import make_poems, train_tiny
from engine.model.checkpoint import load_checkpoint
from engine.poem.vocab import Vocab
from trainer.corpus import Poem, load_corpus
from trainer.data import CLASSIC_LEN, Buckets, classic_tensor, encode_poem
from trainer.evaluate import perplexity
from trainer.train import TrainConfig, Trainer, lr_at, read_progress

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(embed_dim=16, hidden_dim=32, num_layers=1, dropout=0.0, eval_poems=40, batch_tokens=512, min_count=1,
            warmup_steps=5, lr=1e-2, threads=1, half=False)


def poems_of(texts):
    from trainer.corpus import normalise

    return [normalise({"paragraphs": [t]})[0] for t in texts]


# -- batches ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_tokens", [64, 500, 4096])
def test_buckets_hold_one_form_per_batch_and_no_padding(batch_tokens):
    poems = poems_of(make_poems(80))
    vocab = Vocab.build(p.text for p in poems)
    buckets = Buckets.build(vocab, poems)
    assert {f: t.shape[1] for f, t in buckets.tensors.items()} == {"wujue": 26, "qijue": 34, "wulv": 50, "qilv": 66}
    seen = []
    for form, rows in buckets.batches(batch_tokens, seed=1):
        batch = buckets.get(form, rows)
        assert not (batch == vocab.pad_id).any()
        assert (batch[:, 0] == vocab.form_id(form)).all() and (batch[:, -1] == vocab.eos_id).all()
        assert batch.numel() <= max(batch_tokens, batch.shape[1])
        seen += [(form, r) for r in rows.tolist()]
    assert len(seen) == len(set(seen)) == 80  # every poem exactly once an epoch
    assert buckets.num_tokens == sum(len(encode_poem(vocab, p)) - 1 for p in poems)


def test_the_batch_order_is_fixed_by_the_seed_so_resume_can_skip_ahead():
    poems = poems_of(make_poems(40))
    buckets = Buckets.build(Vocab.build(p.text for p in poems), poems)
    a, b, c = (buckets.batches(100, seed=s) for s in (3, 3, 4))
    assert [(f, r.tolist()) for f, r in a] == [(f, r.tolist()) for f, r in b]
    assert [(f, r.tolist()) for f, r in a] != [(f, r.tolist()) for f, r in c]


def test_the_classic_recipe_pre_pads_every_poem_to_125_tokens():
    poems = poems_of(make_poems(8))
    vocab = Vocab.build(p.text for p in poems)
    t = classic_tensor(vocab, poems)
    assert t.shape == (8, CLASSIC_LEN)
    for row, poem in zip(t.tolist(), poems):
        ids = encode_poem(vocab, poem)
        assert row[-len(ids):] == ids and set(row[: -len(ids)]) <= {vocab.pad_id}


@pytest.mark.parametrize("step,progress,expected", [
    (0, 0.0, 0.1 * 1 / 10), (4, 0.0, 0.1 * 5 / 10), (10, 0.0, 0.1), (10, 0.5, 0.1 * (0.05 + 0.95 * 0.5)),
    (500, 1.0, 0.1 * 0.05), (500, 3.0, 0.1 * 0.05),
])
def test_the_learning_rate_warms_up_linearly_then_follows_a_cosine(step, progress, expected):
    cfg = TrainConfig(lr=0.1, warmup_steps=10, min_lr_ratio=0.05)
    assert lr_at(cfg, step, progress) == pytest.approx(expected)


@pytest.mark.parametrize("field,value,problem", [("recipe", "packed", "recipe"), ("optimizer", "lbfgs", "optimizer"),
                                                 ("lr", 0.0, "lr"), ("cell", "transformer", "cell")])
def test_a_bad_training_config_is_rejected(field, value, problem):
    with pytest.raises(ValueError, match=problem):
        TrainConfig(**{field: value}).validate()


# -- training --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_a_tiny_training_run_lowers_the_validation_perplexity(tiny_corpus, tmp_path, cell):
    trainer = Trainer(TrainConfig(corpus=[str(tiny_corpus)], out=str(tmp_path), cell=cell, max_steps=60,
                                  eval_every=60, **TINY), log=lambda m: None)
    before = trainer.evaluate()["ppl"]
    result = trainer.run(progress_bar=False)
    after = trainer.evaluate()["ppl"]
    assert before > 0.8 * len(trainer.vocab)  # untrained: about uniform over the vocabulary
    # The fixture poems are random characters: the floor is about the alphabet size (~200, punctuation
    # aside), so learning shows as a clear drop, not a collapse.
    assert after < 0.85 * before
    assert result["stop_reason"] == "max_steps" and result["step"] == 60
    assert result["best_val_ppl"] == pytest.approx(after, rel=1e-6)
    ckpt = load_checkpoint(tmp_path / "best.safetensors")
    assert ckpt.model.config.cell == cell and ckpt.meta["metrics"]["val_ppl"] == pytest.approx(after, rel=1e-3)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert any("train_loss" in r for r in rows) and any("val_ppl" in r for r in rows)


def test_the_classic_recipe_trains_and_its_checkpoint_says_so(tiny_corpus, tmp_path):
    path = train_tiny(tiny_corpus, tmp_path, recipe="classic", batch_size=16)
    ckpt = load_checkpoint(path)
    assert ckpt.meta["train"]["recipe"] == "classic"
    assert ckpt.meta["metrics"]["val_ppl"] < len(ckpt.vocab)


def test_a_corpus_without_a_validation_split_is_refused(tiny_corpus, tmp_path):
    from trainer.corpus import CorpusError

    with pytest.raises(CorpusError, match="validation split is empty"):
        Trainer(TrainConfig(corpus=[str(tiny_corpus)], out=str(tmp_path), val_percent=0, **TINY))


# -- resume after kill -9 ----------------------------------------------------------------------------------------
# A constant learning rate after the warm-up (--min-lr-ratio 1), so that the run to be killed can be given
# more steps than it will ever take (it cannot finish before the kill, however fast the machine) and still
# follow the same schedule as the 60-step runs it is compared with.
RESUME_ARGS = ["--embed-dim", "16", "--hidden-dim", "32", "--num-layers", "1", "--dropout", "0", "--min-lr-ratio", "1",
               "--eval-every", "100000", "--eval-poems", "20", "--batch-tokens", "256", "--min-count", "1",
               "--threads", "1", "--no-progress", "--no-half", "--warmup-steps", "5", "--lr", "0.01", "--epochs", "100"]


def _saved_step(run: Path) -> int:
    # state.safetensors' header is what --resume reads; state.json is a copy written after it, so a kill
    # between the two renames leaves the copy a save behind.
    try:
        return (read_progress(run) or {}).get("step", 0)
    except ValueError:  # being written
        return 0


def test_resume_after_kill_9_continues_from_the_saved_step_and_ends_where_an_unbroken_run_ends(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", "train", "--corpus", str(tiny_corpus), "--out", str(run), *RESUME_ARGS]
    proc = subprocess.Popen([*cmd, "--save-every", "0", "--max-steps", "100000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _saved_step(run) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGSTOP)  # frozen where it is, so the saved step read below is the last one
    saved = _saved_step(run)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 8 <= saved < 60

    resumed = subprocess.run([*cmd, "--resume", "--max-steps", "60"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {saved} " in resumed.stderr
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["step"] == 60 and result["stop_reason"] == "max_steps"

    # Nothing was lost or trained twice: the weights equal those of a run that was never interrupted.
    unbroken = tmp_path / "unbroken"
    cfg = TrainConfig(corpus=[str(tiny_corpus)], out=str(unbroken), embed_dim=16, hidden_dim=32, num_layers=1,
                      dropout=0.0, max_steps=60, eval_every=100000, eval_poems=20, batch_tokens=256, min_count=1,
                      threads=1, half=False, warmup_steps=5, lr=0.01, min_lr_ratio=1.0, epochs=100, save_every=1e9)
    Trainer(cfg, log=lambda m: None).run(progress_bar=False)
    a, b = load_file(str(run / "state.safetensors")), load_file(str(unbroken / "state.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    steps = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # the killed run's rows after its last save were dropped


def test_resume_refuses_a_different_model_shape(tiny_corpus, tmp_path):
    train_tiny(tiny_corpus, tmp_path, steps=5)
    cfg = TrainConfig(corpus=[str(tiny_corpus)], out=str(tmp_path), **(TINY | {"hidden_dim": 64}))
    with pytest.raises(ValueError, match="hidden_dim"):
        Trainer(cfg, resume=True, log=lambda m: None)


def test_a_tied_model_trains_saves_and_resumes_with_one_shared_matrix(tiny_corpus, tmp_path):
    tied = {"embed_dim": 32, "hidden_dim": 32, "tie_embeddings": True}
    first = TrainConfig(corpus=[str(tiny_corpus)], out=str(tmp_path), **(TINY | tied | {"max_steps": 4, "eval_every": 4}))
    Trainer(first, log=lambda m: None).run(progress_bar=False)
    model = load_checkpoint(tmp_path / "best.safetensors").model
    assert model.config.tie_embeddings and model.head.weight is model.embed.weight
    cfg = TrainConfig(corpus=[str(tiny_corpus)], out=str(tmp_path), **(TINY | tied))
    trainer = Trainer(cfg, resume=True, log=lambda m: None)  # the saved state loads into a tied model
    assert trainer.progress["step"] == 4 and trainer.model.head.weight is trainer.model.embed.weight
    assert torch.equal(trainer.model.embed.weight, model.embed.weight)
    with pytest.raises(ValueError, match="tie_embeddings"):
        Trainer(TrainConfig(corpus=[str(tiny_corpus)], out=str(tmp_path), **(TINY | {"embed_dim": 32, "hidden_dim": 32})),
                resume=True, log=lambda m: None)


# -- trainer eval ----------------------------------------------------------------------------------------------
def test_eval_prints_poems_chars_oov_nll_and_ppl(tiny_checkpoint, tmp_path, capsys):
    from trainer.__main__ import main

    texts = make_poems(6, seed=9)
    # One character the vocabulary cannot know: fed as <unk>, not scored, counted.
    texts[0] = "龘" + texts[0][1:]
    poems_file = tmp_path / "held_out.txt"
    poems_file.write_text("\n".join(texts + ["", "not a poem"]) + "\n", encoding="utf-8")
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--poems", str(poems_file)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"poems", "chars", "oov", "nll", "ppl"} <= set(out)
    assert out["poems"] == 6 and out["oov"] == 1 and out["skipped"] == 1
    assert out["chars"] == sum(len(t) for t in texts) - 1  # punctuation counted, the OOV character not
    assert out["ppl"] == pytest.approx(2.718281828 ** out["nll"], rel=1e-6)


def test_perplexity_of_a_model_that_knows_nothing_is_the_vocabulary_size():
    from engine.model.network import ModelConfig, PoemModel

    poems = poems_of(make_poems(4))
    vocab = Vocab.build(p.text for p in poems)
    model = PoemModel(ModelConfig(vocab_size=len(vocab), embed_dim=4, hidden_dim=4, num_layers=1, dropout=0.0))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    result = perplexity(model, vocab, poems)
    assert result["ppl"] == pytest.approx(len(vocab), rel=1e-5)
    assert result["chars"] == sum(len(p.text) for p in poems)


# -- trainer bench ---------------------------------------------------------------------------------------------
def test_bench_prints_useful_tokens_per_second_for_both_recipes_and_their_ratio(tiny_corpus, capsys):
    from trainer.__main__ import main

    assert main(["bench", "--corpus", str(tiny_corpus), "--seconds", "0.6", "--embed-dim", "16", "--hidden-dim", "32",
                 "--num-layers", "1", "--min-count", "1", "--warmup-steps", "1", "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    ours, classic = out["ours"], out["classic"]
    for side in (ours, classic):
        assert side["steps"] >= 3 and side["useful_tokens_per_s"] > 0  # at least one step in each of 3 slices
    assert ours["padding_share"] == 0.0
    assert classic["padding_share"] > 0.5  # 125-token rows around poems of 26 to 66 tokens
    assert out["ratio"] == pytest.approx(ours["useful_tokens_per_s"] / classic["useful_tokens_per_s"], rel=1e-2)
    assert out["model"]["parameters"] > 0 and out["target_ratio"] == 2.0


def test_useful_tokens_count_text_and_eos_but_never_padding_or_the_form_token():
    from trainer.bench import useful_tokens

    poems = poems_of(make_poems(4))
    vocab = Vocab.build(p.text for p in poems)
    expected = sum(len(p.text) + 1 for p in poems)  # the text and <eos>
    assert useful_tokens(classic_tensor(vocab, poems), vocab) == expected
    rows = [torch.tensor(encode_poem(vocab, p)).unsqueeze(0) for p in poems]
    assert sum(useful_tokens(r, vocab) for r in rows) == expected


@pytest.mark.parametrize("command", ["corpus download", "corpus stats", "train", "eval", "bench"])
def test_every_training_command_is_documented_in_docs_training(command, capsys):
    from trainer.__main__ import build_parser

    text = (ROOT / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    assert f"python -m trainer {command} " in text
    with pytest.raises(SystemExit) as info:  # and the command exists, with its own --help
        build_parser().parse_args([*command.split(), "--help"])
    assert info.value.code == 0 and "usage: python -m trainer" in capsys.readouterr().out
