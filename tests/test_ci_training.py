"""Training on 词: their text as the model sees it, tune tokens, and fine-tuning a 诗 model into a 词 model."""

import pytest
import torch

from engine.model.checkpoint import load_checkpoint
from engine.poem.vocab import CI_TOKEN, tune_token
from conftest import CI_SHAPES, train_tiny
from trainer.corpus import Poem
from trainer.data import Buckets, ci_text, encode_poem, tune_name
from trainer.train import TrainConfig


@pytest.mark.parametrize("raw,expected", [
    ("明月几时有？把酒问青天。", "明月几时有。把酒问青天。"),
    ("转朱阁、低绮户；照无眠：", "转朱阁，低绮户，照无眠，"),
    ("一曲新词酒一杯，\n去年天气旧亭台。", "一曲新词酒一杯，去年天气旧亭台。"),
    ("人生如梦，一尊还酹江月", None),  # no mark at the end: cut short
    ("人生如梦（一作：人间）。", None),  # a note left in the text
])
def test_ci_text_keeps_han_characters_and_rewrites_the_marks(raw, expected):
    assert ci_text(raw) == expected


@pytest.mark.parametrize("raw,expected", [("浣溪沙（春景）", "浣溪沙"), (" 鹧鸪天 ", "鹧鸪天")])
def test_tune_name_drops_a_note_after_the_tune(raw, expected):
    assert tune_name(raw) == expected


def test_ci_poems_name_each_tune_as_the_tune_table_does(tmp_path):
    """"望江南・忆江南" is the tune 忆江南 under another name: trained under 忆江南's token, as served."""
    from conftest import write_ci_corpus

    from trainer.corpus import load_corpus
    from trainer.data import ci_poems

    text = "山水花风云春，月山水花风云。"
    records = [("望江南・忆江南", text), ("忆江南", "春" + text), ("忆江南", "秋" + text), ("失调名", "夜" + text)]
    corpus = load_corpus([str(write_ci_corpus(tmp_path, records))], include_ci=True)
    assert sorted(p.title for p in ci_poems(corpus)) == ["", "忆江南", "忆江南", "忆江南"]


def test_a_vocabulary_grown_for_ci_has_the_ci_token_even_without_tune_tokens(tiny_checkpoint):
    from trainer.data import ci_vocab

    shi = load_checkpoint(tiny_checkpoint).vocab
    poems = [Poem(text="月。", form="ci", source="ci.song", title=t) for t in ("浣溪沙", "鹧鸪天")]
    grown = ci_vocab(shi, poems, min_count=5, tune_tokens=80)  # no tune reaches min_count
    assert grown.writes_ci and encode_poem(grown, poems[0])[0] == grown.index[CI_TOKEN]


def test_a_ci_opens_with_its_tune_token_and_is_bucketed_by_length(tiny_ci_checkpoint):
    vocab = load_checkpoint(tiny_ci_checkpoint).vocab
    a = Poem(text="月山水花风云春，" * 2 + "月山水花风云春。", form="ci", source="ci.song", title="浣溪沙")
    b = Poem(text="月。", form="ci", source="ci.song", title="无名调")
    assert encode_poem(vocab, a)[0] == vocab.index[tune_token("浣溪沙")]
    assert encode_poem(vocab, b)[0] == vocab.index[CI_TOKEN]
    buckets = Buckets.build(vocab, [a, b, a])
    assert sorted(buckets.tensors) == ["ci:26", "ci:4"] and buckets.tensors["ci:26"].shape == (2, 26)


def test_fine_tuning_on_ci_grows_the_vocabulary_and_keeps_what_the_shi_model_knew(tiny_checkpoint, tiny_ci_checkpoint):
    shi, ci = load_checkpoint(tiny_checkpoint), load_checkpoint(tiny_ci_checkpoint)
    assert ci.vocab.tokens[: ci.vocab.end_han_id][: len(shi.vocab)] == shi.vocab.tokens
    assert ci.vocab.writes_ci and not shi.vocab.writes_ci
    # The two most common tunes (tune_tokens=2) have their own token, the third shares <ci>.
    tunes = ci.vocab.tokens[ci.vocab.end_han_id:]
    assert tunes[0] == CI_TOKEN and len(tunes) == 3 and set(tunes[1:]) < {tune_token(t) for t in CI_SHAPES}
    assert ci.meta["train"]["kind"] == "ci" and ci.meta["metrics"]["val_ppl"] < len(ci.vocab)


def test_the_copied_rows_start_the_fine_tuning_where_the_shi_model_was(tiny_checkpoint, tiny_ci_corpus, tmp_path):
    """Zero steps of fine-tuning: a shared token's embedding equals the 诗 model's."""
    from trainer.train import Trainer

    shi = load_checkpoint(tiny_checkpoint)
    trainer = Trainer(TrainConfig(corpus=[str(tiny_ci_corpus)], out=str(tmp_path), kind="ci", init_from=str(tiny_checkpoint),
                                  embed_dim=16, hidden_dim=32, num_layers=1, dropout=0.0, min_count=1, threads=1),
                      log=lambda m: None)
    for ch in ("月", "，", "<eos>"):
        new, old = trainer.vocab.index[ch], shi.vocab.index[ch]
        assert torch.equal(trainer.model.embed.weight[new], shi.model.embed.weight[old].float())
        assert torch.equal(trainer.model.head.weight[new], shi.model.head.weight[old].float())


def test_ci_training_refuses_a_packed_corpus():
    with pytest.raises(ValueError, match="kind ci"):
        TrainConfig(kind="ci", packed="data/packed.safetensors").validate()
    with pytest.raises(ValueError, match="kind must be"):
        TrainConfig(kind="fu").validate()


def test_a_ci_run_from_scratch_builds_its_vocabulary_from_the_ci(tiny_ci_corpus, tmp_path):
    path = train_tiny(tiny_ci_corpus, tmp_path, kind="ci", steps=10)
    vocab = load_checkpoint(path).vocab
    assert vocab.writes_ci and vocab.tune_id("浣溪沙") != vocab.index[CI_TOKEN]


def test_a_corpus_without_ci_says_how_to_get_them(tiny_corpus, tmp_path):
    from trainer.corpus import CorpusError
    from trainer.train import Trainer

    with pytest.raises(CorpusError, match="--include-ci"):
        Trainer(TrainConfig(corpus=[str(tiny_corpus)], out=str(tmp_path), kind="ci", min_count=1, threads=1))
