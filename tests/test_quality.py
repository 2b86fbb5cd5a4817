"""The poem judge and the `python -m trainer quality` report."""

from __future__ import annotations

import argparse
import json

import pytest

from engine.poem.judge import check_poem
from trainer import quality

# Synthetic poems built from the fixture's characters (not from the corpus).
REGULAR = "山东风月雪，云雨深花香。江水清天落，人飞燕去阳。"  # 平起: every tone position fits, 阳 rhymes 香


def test_a_regular_poem_passes_every_check():
    check = check_poem(REGULAR, "wujue")
    assert check.form_valid and check.rhyme and check.ok
    assert check.tone_agreement == 1.0 and check.tone_positions == 12


@pytest.mark.parametrize("text", [
    "山东风月雪，云深夜雨香。江清花水落，人去燕飞阳",  # no final mark
    "山东风月雪。云深夜雨香。江清花水落，人去燕飞阳。",  # 。 where ， belongs
    "山东风月，云深夜雨香。江清花水落，人去燕飞阳。",  # a short line
    "山东风月雪，云深夜雨香。",  # too few lines
    "山东风月雪，云深夜雨香。江清花水落，人去燕飞阳。山东风月雪，云深夜雨香。",  # too many
    "山东风A雪，云深夜雨香。江清花水落，人去燕飞阳。",  # a non-Han character
])
def test_broken_layouts_are_not_form_valid(text):
    check = check_poem(text, "wujue")
    assert not check.form_valid and not check.rhyme and not check.ok


def test_even_line_ends_in_different_groups_do_not_rhyme():
    assert not check_poem("山东风月雪，云深夜雨香。江清花水落，人去燕飞东。", "wujue").rhyme


def test_an_oblique_even_line_end_does_not_rhyme():
    assert not check_poem("山东风月雪，云深夜雨香。江清花水落，人去燕飞月。", "wujue").rhyme


def test_tone_agreement_counts_the_positions_that_fit():
    # Swap line 1's 4th character for a level one: 1 of 12 positions breaks.
    check = check_poem("山东风花雪，云雨深花香。江水清天落，人飞燕去阳。", "wujue")
    assert check.tone_agreement == pytest.approx(11 / 12)


def test_repetition_is_found():
    check = check_poem("山山风月雪，云深山雨香。江清花水落，人去燕飞阳。", "wujue")
    assert check.repeated_chars == ["山"] and not check.ok
    assert check_poem("山东风月雪，云深夜雨香。山东风月雪，人去燕飞阳。", "wujue").repeated_line


def test_form_aliases_are_accepted():
    assert check_poem(REGULAR, "五绝").form_valid


def test_evaluate_prints_json_and_a_table_for_both_decodings(tiny_checkpoint, tiny_corpus, capsys):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tiny_checkpoint), "--corpus", str(tiny_corpus), "--n", "2",
                              "--forms", "wujue", "qilv"])
    assert quality.main(args) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    cells = report["cells"]
    assert len(cells) == 2 * 3 * 2  # forms × modes × {constrained, free}
    for cell in cells:
        assert cell["poems"] == 2 and 0 <= cell["copied_lines"] <= 1 and cell["poems_per_s"] > 0
        if cell["decoding"] == "constrained":
            assert cell["form_valid"] == 1.0 and cell["rhyme"] == 1.0 and cell["repeat3"] == 0.0
    assert "| form" in out and "constrained" in out and "free" in out


def test_evaluate_reports_a_missing_checkpoint(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    assert quality.main(parser.parse_args(["--checkpoint", str(tmp_path / "x.safetensors")])) == 2
    assert "x.safetensors" in capsys.readouterr().err


def test_variety_counts_lines_shared_between_poems_and_formula_spans():
    poems = [["山东风月雪", "云雨深花香"], ["山东风月雪", "江水清天落"], ["人飞燕去阳", "水清花落香"]]
    v = quality.variety(poems)
    assert v["shared_lines"] == pytest.approx(2 / 6)  # 山东风月雪 stands in two poems
    assert v["formula_4grams"] == pytest.approx(4 / 12)  # 山东风月 and 东风月雪, in two of three poems
    assert set(v["top_formulas"]) == {"山东风月", "东风月雪"}


def test_variety_of_poems_that_share_nothing_is_zero():
    v = quality.variety([["山东风月雪"], ["云雨深花香"], ["江水清天落"]])
    assert v["shared_lines"] == 0 and v["formula_4grams"] == 0 and v["distinct_2"] == 1.0


def test_the_report_measures_variety_and_held_out_perplexity(tiny_checkpoint, tiny_corpus, capsys):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tiny_checkpoint), "--corpus", str(tiny_corpus), "--n", "0",
                              "--variety", "6", "--modes", "greedy", "sample", "--held-out", "20"])
    assert quality.main(args) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert set(report["variety"]) == {"greedy", "sample"} and "cells" not in report
    for v in report["variety"].values():
        assert 0 < v["poems"] <= 6 and 0 <= v["shared_lines"] <= 1 and 0 <= v["formula_4grams"] <= 1
    assert report["held_out"]["poems"] > 0 and report["held_out"]["ppl"] > 1
    assert "variety greedy" in out and "held-out perplexity" in out


def test_held_out_needs_a_corpus(tiny_checkpoint, capsys):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    assert quality.main(parser.parse_args(["--checkpoint", str(tiny_checkpoint), "--held-out", "5"])) == 2
    assert "--corpus" in capsys.readouterr().err


def test_the_report_covers_ci_per_tune_with_variety_and_held_out_ci(tiny_ci_checkpoint, tiny_ci_corpus, capsys):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tiny_ci_checkpoint), "--corpus", str(tiny_ci_corpus), "--n", "0",
                              "--ci", "2", "--tunes", "浣溪沙", "菩萨蛮", "--modes", "greedy", "beam",
                              "--held-out", "10"])
    assert quality.main(args) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    rows = report["ci"]["tunes"]
    assert [(r["tune"], r["mode"]) for r in rows] == [("浣溪沙", "greedy"), ("浣溪沙", "beam"),
                                                      ("菩萨蛮", "greedy"), ("菩萨蛮", "beam")]
    assert all(r["structure"] == 1.0 and r["poems"] == 2 for r in rows)
    assert report["ci"]["variety"]["beam"]["poems"] == 4
    assert report["held_out_ci"]["poems"] > 0 and "| 浣溪沙 | greedy | 2 | 100% |" in out and "held-out 词" in out


@pytest.mark.parametrize("argv,problem", [(["--ci", "1", "--tunes", "无此调"], "unknown tune"), (["--ci", "1"], "trained on 词")])
def test_a_ci_report_needs_known_tunes_and_a_ci_model(tiny_checkpoint, capsys, argv, problem):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    assert quality.main(parser.parse_args(["--checkpoint", str(tiny_checkpoint), "--n", "0", *argv])) == 2
    assert problem in capsys.readouterr().err


def test_the_ci_report_takes_traditional_tune_names(tiny_ci_checkpoint, capsys):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tiny_ci_checkpoint), "--n", "0", "--ci", "1", "--tunes", "浣溪紗",
                              "--modes", "greedy"])
    assert quality.main(args) == 0
    assert "| 浣溪沙 | greedy | 1 |" in capsys.readouterr().out
