"""Training away from the corpus: the packed training set, int8 checkpoints, checkpoints in parts, and
scripts/gpu_train.sh itself, run here on the CPU at toy size (on a GPU machine it runs as is)."""

from __future__ import annotations

import lzma
import os
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from engine.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainer.corpus import CorpusError, load_corpus, split
from trainer.data import Buckets
from trainer.evaluate import perplexity
from trainer.export import export, join
from trainer.pack import _sample, load_pack, pack_corpus
from engine.poem.vocab import Vocab

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def packed(tiny_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack") / "packed.safetensors"
    pack_corpus([str(tiny_corpus)], out, min_count=1)
    return out


def test_the_pack_holds_the_training_split_encoded_and_keeps_the_held_out_poems_apart(tiny_corpus, packed):
    pack = load_pack(packed)
    train, val = split(load_corpus([str(tiny_corpus)]).regular())
    want_train, want_val = Buckets.build(pack.vocab, train), Buckets.build(pack.vocab, val)
    assert pack.train.tensors.keys() == want_train.tensors.keys()
    for form, t in want_train.tensors.items():
        assert torch.equal(pack.train.tensors[form], t)
    for form, t in want_val.tensors.items():
        assert torch.equal(pack.val.tensors[form], t)
    train_rows = {tuple(r) for t in pack.train.tensors.values() for r in t.tolist()}
    assert not train_rows & {tuple(r) for t in pack.val.tensors.values() for r in t.tolist()}


def test_a_compressed_pack_with_fewer_held_out_poems_reads_back_the_same_training_split(tiny_corpus, packed, tmp_path):
    out = tmp_path / "packed.safetensors.xz"
    pack_corpus([str(tiny_corpus)], out, min_count=1, val_poems=7, xz=True)
    plain, small = load_pack(packed), load_pack(out)
    assert out.stat().st_size < packed.stat().st_size / 2
    assert small.vocab.tokens == plain.vocab.tokens and small.corpus_hash == plain.corpus_hash
    assert all(torch.equal(small.train.tensors[k], t) for k, t in plain.train.tensors.items())
    val_rows = lambda pack: {tuple(r) for t in pack.val.tensors.values() for r in t.tolist()}  # noqa: E731
    assert len(val_rows(small)) == 7 and val_rows(small) <= val_rows(plain)
    # Drawn over the whole held-out split, not its first poems (the corpus lists Song before Tang), the same
    # every time, in corpus order.
    kept = _sample(list(range(1000)), 50)
    assert kept == sorted(kept) == _sample(list(range(1000)), 50) and kept[-1] > 900 and kept[0] < 100
    assert _sample(list(range(10)), 0) == list(range(10))
    for header in (b"[1,2]", b'{"__metadata__": [1]}'):  # xz, but no safetensors header inside
        odd = tmp_path / "odd.safetensors.xz"
        odd.write_bytes(lzma.compress(struct.pack("<Q", len(header)) + header))
        with pytest.raises(CorpusError, match="not a packed corpus"):
            load_pack(odd)
    broken = tmp_path / "broken.safetensors.xz"
    broken.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(CorpusError, match="not a packed corpus"):
        load_pack(broken)


def test_irregular_poems_give_stanzas_of_four_even_lines_at_couplet_starts():
    from trainer.corpus import Poem
    from trainer.data import stanza_poems

    vocab = Vocab.build(["春风山月水云花鸟天地人家江湖日夜"])
    six = Poem("春风山月水，云花鸟天地。人家江湖日，夜春风山月。水云花鸟天，地人家江湖。", "other", "poet.tang")
    ragged = Poem("春风山月水云花，鸟天地人家。江湖日夜春风山，月水云花鸟天地。人家江湖日夜春，风山月水云花鸟。"
                  "天地人家江湖日，夜春风山月水云。", "other", "poet.tang")
    odd = Poem("春风山月水，云花鸟天地。人家江湖日，夜春风山月。", "other", "ci.song.0")  # a 词 source: never
    unknown = Poem("春风山月水，云花鸟天地。人家江湖日，夜春风山雪。", "other", "poet.tang")  # 雪: not in vocab
    regular = Poem("春风山月水，云花鸟天地。人家江湖日，夜春风山月。", "wujue", "poet.tang")  # already trained on
    out = stanza_poems([six, ragged, odd, unknown, regular], vocab)
    assert [(p.form, p.text) for p in out] == [
        ("wujue", "春风山月水，云花鸟天地。人家江湖日，夜春风山月。"),
        # the ragged poem's first couplet is uneven: its stanza starts at the second couplet
        ("qijue", "江湖日夜春风山，月水云花鸟天地。人家江湖日夜春，风山月水云花鸟。"),
    ]
    assert stanza_poems([six], vocab, avoid_lines={"夜春风山月"}) == []


def test_a_pack_with_stanzas_trains_on_more_and_keeps_the_held_out_poems(tiny_corpus, packed, tmp_path):
    from conftest import make_poems, write_corpus

    lines = [p for text in make_poems(60, seed=9) for p in text.replace("。", "，").split("，") if len(p) == 7]
    irregular = ["".join(line + "，。"[j % 2] for j, line in enumerate(lines[k:k + 6])) for k in range(0, 60, 6)]
    # tiny_corpus's poems, and six-line poems: irregular, one stanza each
    corpus = write_corpus(tmp_path / "corpus", make_poems(400, seed=1) + irregular)
    out = tmp_path / "packed.safetensors"
    meta = pack_corpus([str(corpus)], out, min_count=1, include_stanzas=True)
    plain, more = load_pack(packed), load_pack(out)
    assert meta["stanzas"] > 0 and more.vocab.tokens == plain.vocab.tokens
    assert more.train.num_poems == plain.train.num_poems + meta["stanzas"]
    assert all(torch.equal(more.val.tensors[k], t) for k, t in plain.val.tensors.items())


def test_a_file_that_is_not_a_pack_is_refused_by_name(tmp_path, tiny_checkpoint):
    from trainer.corpus import CorpusError

    with pytest.raises(CorpusError, match="not a packed corpus"):
        load_pack(tiny_checkpoint)


def test_training_on_the_pack_gives_a_checkpoint_with_its_vocabulary(packed, tmp_path):
    from trainer.train import Trainer, TrainConfig

    cfg = TrainConfig(packed=str(packed), out=str(tmp_path / "run"), cell="gru", embed_dim=16, hidden_dim=32,
                      num_layers=1, dropout=0.0, max_steps=20, eval_every=20, eval_poems=40, batch_tokens=512,
                      warmup_steps=5, lr=1e-2, threads=1, half=False)
    result = Trainer(cfg, log=lambda m: None).run(progress_bar=False)
    ckpt = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert result["step"] == 20 and ckpt.vocab.tokens == load_pack(packed).vocab.tokens
    assert ckpt.meta["corpus_hash"] == load_pack(packed).corpus_hash


def test_the_deadline_counts_evaluations_and_ends_the_cosine_inside_it(packed, tmp_path):
    """A lent GPU machine gives minutes: the run must stop inside them, evaluations included (a 5-minute
    training budget once took 7: the 124 evaluations were not counted), with its learning rate at the floor."""
    from trainer.train import Trainer, TrainConfig

    cfg = TrainConfig(packed=str(packed), out=str(tmp_path / "run"), cell="gru", embed_dim=16, hidden_dim=32,
                      num_layers=1, dropout=0.0, deadline=1.0, epochs=1000, eval_every=1, eval_poems=40,
                      batch_tokens=512, warmup_steps=0, lr=1e-2, min_lr_ratio=0.05, patience=1000, threads=1,
                      half=False)
    trainer = Trainer(cfg, log=lambda m: None)
    now = [0.0]
    trainer.wall = lambda: now[0]
    evaluate = trainer._evaluate_and_keep_here

    def slow_evaluation(history):  # each evaluation takes 30 s of the deadline's clock, the steps none
        now[0] += 30.0
        return evaluate(history)

    trainer._evaluate_and_keep_here = slow_evaluation
    result = trainer.run(progress_bar=False)
    assert result["stop_reason"] == "deadline" and result["step"] == 3
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_short_epochs_are_evaluated_every_eval_every_steps_and_at_the_last_epoch_end(packed, tmp_path):
    import json

    from trainer.train import Trainer, TrainConfig

    cfg = TrainConfig(packed=str(packed), out=str(tmp_path / "run"), cell="gru", embed_dim=16, hidden_dim=32,
                      num_layers=1, dropout=0.0, epochs=6, eval_every=10, eval_poems=40, batch_tokens=4096,
                      warmup_steps=0, patience=1000, threads=1, half=False)
    trainer = Trainer(cfg, log=lambda m: None)
    per_epoch = len(trainer._epoch_shares(0))
    assert per_epoch < cfg.eval_every  # the tiny pack's epochs are short, as a GPU's are
    result = trainer.run(progress_bar=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in rows if "val_ppl" in r]
    total = result["step"]
    assert total == 6 * per_epoch and result["stop_reason"] == "epochs"
    assert evaluated == [s for s in range(10, total + 1, 10)] + ([total] if total % 10 else [])
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_a_pack_with_the_ci_trains_one_model_that_writes_shi_and_ci(tiny_ci_corpus, tmp_path):
    from engine.api import PoemRequest
    from engine.poem.forms import FORMS, classify
    from engine.poem.prosody import prosody_for
    from engine.poem.tunes import TUNES, check_ci
    from engine.reference import generate_one
    from trainer.train import Trainer, TrainConfig

    out = tmp_path / "packed.safetensors"
    pack_corpus([str(tiny_ci_corpus)], out, min_count=1, include_ci=True)
    pack = load_pack(out)
    assert pack.vocab.writes_ci and any(k.startswith("ci:") for k in pack.train.tensors)
    assert {"qijue", "wujue"} <= set(pack.train.tensors)
    cfg = TrainConfig(packed=str(out), out=str(tmp_path / "run"), cell="lstm", embed_dim=16, hidden_dim=32, num_layers=1,
                      dropout=0.0, max_steps=10, eval_every=10, eval_poems=40, batch_tokens=512, threads=1, half=False)
    Trainer(cfg, log=lambda m: None).run(progress_bar=False)
    ckpt = load_checkpoint(tmp_path / "run" / "best.safetensors")
    prosody = prosody_for(ckpt.vocab)
    ci = generate_one(ckpt.model, ckpt.vocab, prosody, PoemRequest(form="ci", tune="浣溪沙", seed=1).validate())
    shi = generate_one(ckpt.model, ckpt.vocab, prosody, PoemRequest(form="wulv", seed=1).validate())
    assert check_ci(TUNES["浣溪沙"], ci.poem).structure_ok and classify(shi.lines) is FORMS["wulv"]


def test_a_pack_of_a_corpus_without_ci_refuses_include_ci(tiny_corpus, tmp_path):
    from trainer.corpus import CorpusError

    with pytest.raises(CorpusError):
        pack_corpus([str(tiny_corpus)], tmp_path / "p.safetensors", min_count=1, include_ci=True)
    assert not (tmp_path / "p.safetensors").exists()


def test_an_int8_checkpoint_is_a_quarter_the_size_and_scores_almost_the_same(tiny_checkpoint, tiny_corpus, tmp_path):
    ckpt = load_checkpoint(tiny_checkpoint)
    small = tmp_path / "int8.safetensors"
    save_checkpoint(small, ckpt.model, ckpt.vocab, {"metrics": ckpt.meta.get("metrics", {})}, int8=True)
    assert small.stat().st_size < 0.4 * tiny_checkpoint.stat().st_size  # fp32 → int8 plus scales and header
    back = load_checkpoint(small)
    assert back.meta["dtype"] == "int8"
    _, val = split(load_corpus([str(tiny_corpus)]).regular())
    a, b = perplexity(ckpt.model, ckpt.vocab, val), perplexity(back.model, back.vocab, val)
    assert b["ppl"] == pytest.approx(a["ppl"], rel=0.02)


def test_an_int8_matrix_without_its_scales_is_refused(tiny_checkpoint, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save

    ckpt = load_checkpoint(tiny_checkpoint)
    small = tmp_path / "int8.safetensors"
    save_checkpoint(small, ckpt.model, ckpt.vocab, int8=True)
    with safe_open(str(small), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    dropped = {k: v for k, v in tensors.items() if k != "head.weight.scale"}
    body = json.loads(meta["yinshi"])
    from engine.model.checkpoint import meta_digest, weights_digest

    body["weights_sha256"] = weights_digest(dropped)
    body["meta_sha256"] = meta_digest(body)
    small.write_bytes(save(dropped, metadata={"yinshi": json.dumps(body, ensure_ascii=False)}))
    with pytest.raises(CheckpointError, match="no scales"):
        load_checkpoint(small)


def test_export_splits_into_small_parts_and_join_restores_the_checkpoint(tiny_checkpoint, tmp_path):
    report = export(tiny_checkpoint, tmp_path / "out", "lstm", part_mib=0.02)
    parts = sorted((tmp_path / "out").glob("lstm.safetensors.part*"))
    assert len(parts) == len(report["parts"]) > 2
    assert all(p.stat().st_size <= int(0.02 * (1 << 20)) for p in parts)
    joined = tmp_path / "joined.safetensors"
    join(parts[0], joined)
    a, b = load_checkpoint(tiny_checkpoint), load_checkpoint(joined)
    assert a.version == b.version
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("part_mib", [0.00001, 0, -1])
def test_export_refuses_parts_join_could_not_read_back_and_keeps_the_old_ones(tiny_checkpoint, tmp_path, part_mib):
    """Over 1,000 parts the names grow a digit that join's partNNN never matches: refused before writing."""
    export(tiny_checkpoint, tmp_path / "out", "lstm", part_mib=0.02)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match="part-mib"):
        export(tiny_checkpoint, tmp_path / "out", "lstm", part_mib=part_mib)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


@pytest.mark.parametrize("damage", ["flip", "missing"])
def test_join_refuses_damaged_or_missing_parts_and_writes_nothing(tiny_checkpoint, tmp_path, damage):
    export(tiny_checkpoint, tmp_path / "out", "lstm", part_mib=0.02)
    parts = sorted((tmp_path / "out").glob("lstm.safetensors.part*"))
    if damage == "flip":
        data = bytearray(parts[1].read_bytes())
        data[7] ^= 0x10
        parts[1].write_bytes(bytes(data))
    else:
        parts[1].unlink()
    joined = tmp_path / "joined.safetensors"
    with pytest.raises(CheckpointError, match="do not match"):
        join(parts[0], joined)
    assert not joined.exists()


def test_export_reports_the_dtype_it_wrote_and_join_refuses_an_empty_manifest(tiny_checkpoint, tmp_path):
    small = tmp_path / "int8"
    export(tiny_checkpoint, small, "lstm", int8=True)
    join(small / "lstm.safetensors.part000", tmp_path / "int8.safetensors")
    again = export(tmp_path / "int8.safetensors", tmp_path / "again", "lstm")  # an int8 input, no --int8
    joined = tmp_path / "again.safetensors"
    join(tmp_path / "again" / "lstm.safetensors.part000", joined)
    assert again["dtype"] == load_checkpoint(joined).meta["dtype"] != "int8"  # it said int8: float32 was written
    (tmp_path / "again" / "lstm.safetensors.sha256").write_text("")
    with pytest.raises(CheckpointError, match="no SHA-256"):
        join(tmp_path / "again" / "lstm.safetensors.part000", tmp_path / "never.safetensors")
    assert not (tmp_path / "never.safetensors").exists()


def test_the_gpu_script_runs_end_to_end_at_toy_size_on_the_cpu(packed, tmp_path):
    env = dict(os.environ, PACK=str(packed), DEVICE="cpu", CELL="gru", EMBED="16", HIDDEN="32", LAYERS="1",
               DROPOUT="0", INPUT_DROPOUT="0.2", BATCH_TOKENS="512", MAX_STEPS="15", EVAL_EVERY="15", MINUTES="5",
               PART_MIB="0.01", NAME="gru", RUN_DIR=str(tmp_path / "run"))
    out = tmp_path / "OUT"
    done = subprocess.run(["bash", "scripts/gpu_train.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    parts = sorted(out.glob("gru.safetensors.part*"))
    assert parts and all(p.stat().st_size <= int(0.01 * (1 << 20)) for p in parts)
    assert (out / "train.log").is_file() and (out / "history.jsonl").is_file()
    join(parts[0], tmp_path / "gru.safetensors")
    ckpt = load_checkpoint(tmp_path / "gru.safetensors")
    assert ckpt.model.config.cell == "gru" and ckpt.meta["train"]["packed"] == str(packed)
    assert ckpt.model.config.input_dropout == 0.2  # every knob reaches the trainer


def test_the_gpu_script_says_what_to_do_without_the_pack(tmp_path):
    env = dict(os.environ, PACK=str(tmp_path / "none.safetensors"))
    done = subprocess.run(["bash", "scripts/gpu_train.sh", str(tmp_path / "OUT")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "trainer corpus pack" in done.stderr
