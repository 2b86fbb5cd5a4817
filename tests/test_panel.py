"""The blind panel: held-out poems by poets shuffled with generated ones, and the scores read back."""

from __future__ import annotations

import json

import pytest

from trainer import panel


@pytest.fixture(scope="module")
def made(tiny_corpus, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("panel")
    report = panel.make([str(tiny_corpus)], [f"a={tiny_checkpoint}:sample", f"b={tiny_checkpoint}:beam"], 4, out)
    return out, report


def test_the_panel_pairs_each_held_out_poem_with_one_poem_per_system(made, tiny_corpus):
    from trainer.quality import held_out_poems

    out, report = made
    key = json.loads((out / "key.json").read_text())
    humans = [e for e in key if e["source"] == "human"]
    assert report["human"] == len(humans) == 4 and len(key) == 12
    held_out = {p.text for p in held_out_poems([str(tiny_corpus)], 1000)}
    assert all(e["poem"] in held_out for e in humans)
    for source in ("a", "b"):
        mine = [e for e in key if e["source"] == source]
        assert sorted((e["form"], e["opening"]) for e in mine) == sorted((e["form"], e["opening"]) for e in humans)
        assert all(e["poem"].startswith(e["opening"]) for e in mine)


def test_another_seed_draws_other_held_out_poems(tiny_corpus, tiny_checkpoint, tmp_path):
    from trainer.quality import held_out_poems

    def poets(seed):
        panel.make([str(tiny_corpus)], [f"a={tiny_checkpoint}:greedy"], 4, tmp_path / str(seed), seed=seed)
        key = json.loads((tmp_path / str(seed) / "key.json").read_text())
        return {e["poem"] for e in key if e["source"] == "human"}

    held_out = {p.text for p in held_out_poems([str(tiny_corpus)], 1000)}
    first, second = poets(0), poets(1)
    assert first <= held_out and second <= held_out and first != second
    assert poets(1) == second  # the same seed, the same panel


def test_the_reader_sees_the_poems_numbered_and_nothing_of_who_wrote_them(made):
    out, _ = made
    text = (out / "poems.txt").read_text()
    key = json.loads((out / "key.json").read_text())
    for e in key:
        assert f"{e['id']}. {e['poem']}" in text
    assert "human\"" not in text.split("\n\n", 1)[1] and "sample" not in text and "beam" not in text


def test_scores_are_averaged_per_source(made):
    out, _ = made
    key = json.loads((out / "key.json").read_text())
    scores = [{"id": e["id"], "通顺": 5 if e["source"] == "human" else 2, "连贯": 4, "意义": 4, "诗意": 3,
               "human": e["source"] != "b"} for e in key]
    (out / "scores.json").write_text(json.dumps(scores, ensure_ascii=False))
    report = panel.score(out)
    assert report["human"]["mean"] == pytest.approx((5 + 4 + 4 + 3) / 4)
    assert report["a"]["mean"] == pytest.approx((2 + 4 + 4 + 3) / 4) and report["a"]["taken_for_human"] == 1.0
    assert report["b"]["taken_for_human"] == 0.0


@pytest.mark.parametrize("bad", [{"通顺": 6}, {"通顺": 0}, {"id": 999}])
def test_a_bad_or_incomplete_answer_is_refused(made, bad):
    out, _ = made
    key = json.loads((out / "key.json").read_text())
    scores = [{"id": e["id"], "通顺": 3, "连贯": 3, "意义": 3, "诗意": 3, "human": False} for e in key]
    scores[0].update(bad)
    (out / "scores.json").write_text(json.dumps(scores, ensure_ascii=False))
    with pytest.raises(ValueError):
        panel.score(out)
