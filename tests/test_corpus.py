"""Corpus reading: normalisation of noisy records, sources, deduplication, split stability, `corpus stats`,
and one clear error line from every trainer command for a malformed, missing or empty corpus."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_poems, write_corpus
from trainer.corpus import Corpus, CorpusError, find_files, load_corpus, normalise, source_name, split, split_of
from trainer.stats import corpus_stats, format_report

ROOT = Path(__file__).resolve().parent.parent
JINGYESI = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"


def write_records(root: Path, name: str, records, folder: str = "全唐诗") -> Path:
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.mark.parametrize("paragraphs,text,form", [
    (["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"], JINGYESI, "wujue"),
    (["床前明月光（一作看月光），疑是地上霜。", "举头望明月，低头思故乡。"], JINGYESI, "wujue"),  # a note in brackets
    (["床前明月光〖注〗，疑是地上霜。", "举头望明月，低头思故乡〔一〕。"], JINGYESI, "wujue"),
    (["床前明月光，疑是地上霜？", "举头望明月！低头思故乡。"], JINGYESI, "wujue"),  # ？！ become ，。
    (["「床前明月光」，疑是地上霜。 ", "举头望明月，　低头思故乡。"], JINGYESI, "wujue"),  # quotes, spaces
    (["國破山河在，城春草木深。", "感時花濺淚，恨別鳥驚心。"], "国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。", "wujue"),
    (["朝辭白帝彩雲間，千里江陵一日還。", "兩岸猿聲啼不住，輕舟已過萬重山。"],
     "朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。", "qijue"),
    (["一二三四五，六七八九十。"] * 4, "一二三四五，六七八九十。" * 4, "wulv"),
    (["一二三四五六七，八九十百千万亿。"] * 4, "一二三四五六七，八九十百千万亿。" * 4, "qilv"),
])
def test_a_record_is_normalised_to_simplified_text_in_the_regular_layout(paragraphs, text, form):
    poem, why = normalise({"author": "李白", "title": "静夜思", "paragraphs": paragraphs})
    assert why == ""
    assert (poem.text, poem.form) == (text, form)


def test_normalise_converts_author_and_title_to_simplified():
    poem, _ = normalise({"author": "杜甫", "title": "春望", "paragraphs": ["國破山河在，城春草木深。"]})
    assert (poem.author, poem.title) == ("杜甫", "春望")
    poem, _ = normalise({"author": "蘇軾", "title": "題西林壁", "paragraphs": ["橫看成嶺側成峰，遠近高低各不同。"]})
    assert (poem.author, poem.title) == ("苏轼", "题西林壁")


@pytest.mark.parametrize("record,why", [
    ({"paragraphs": []}, "empty"),
    ({"paragraphs": ["", "  "]}, "empty"),
    ({"paragraphs": ["（注文）"]}, "empty"),
    ({"paragraphs": ["床前□月光，疑是地上霜。"]}, "missing characters (□)"),
    ({"paragraphs": ["床前明月光，疑是地上■。"]}, "missing characters (□)"),
    ({"paragraphs": ["床前明月光，疑是地上霜2。"]}, "non-Han characters in a line"),
    ({"paragraphs": ["Moonlight before my bed，疑是地上霜。"]}, "non-Han characters in a line"),
    ({"title": "无题"}, "no paragraphs list"),
    ({"paragraphs": "床前明月光，疑是地上霜。"}, "no paragraphs list"),
    ({"paragraphs": ["床前明月光", 7]}, "no paragraphs list"),
    (["床前明月光"], "not an object"),
    (None, "not an object"),
])
def test_a_broken_record_is_dropped_with_the_reason(record, why):
    assert normalise(record) == (None, why)


def test_load_corpus_drops_duplicates_including_traditional_copies_of_simplified_poems(tmp_path):
    write_records(tmp_path, "poet.tang.0.json", [
        {"paragraphs": ["國破山河在，城春草木深。", "感時花濺淚，恨別鳥驚心。"]},
        {"paragraphs": ["国破山河在，城春草木深。", "感时花溅泪，恨别鸟惊心。"]},
        {"paragraphs": [JINGYESI]},
        {"paragraphs": ["床前□月光，疑是地上霜。"]},
        {"paragraphs": []},
    ])
    write_records(tmp_path, "唐诗三百首.json", [{"paragraphs": [JINGYESI], "tags": ["五言绝句"]}])
    corpus = load_corpus([tmp_path])
    assert [p.text for p in corpus.poems] == ["国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。", JINGYESI]
    assert corpus.dropped == {"duplicate": 2, "missing characters (□)": 1, "empty": 1}
    assert [p.source for p in corpus.poems] == ["poet.tang", "poet.tang"]


def test_sources_are_named_after_the_files(tmp_path):
    write_records(tmp_path, "poet.tang.0.json", [{"paragraphs": [JINGYESI]}])
    write_records(tmp_path, "poet.song.1000.json", [{"paragraphs": ["白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]}])
    write_records(tmp_path, "唐诗三百首.json", [{"paragraphs": ["朝辞白帝彩云间，千里江陵一日还。两岸猿声啼不住，轻舟已过万重山。"]}])
    write_records(tmp_path, "ci.song.0.json", [{"rhythmic": "如梦令", "paragraphs": ["常记溪亭日暮，沉醉不知归路。"]}], "宋词")
    assert sorted({p.source for p in load_corpus([tmp_path]).poems}) == ["poet.song", "poet.tang", "唐诗三百首"]
    with_ci = load_corpus([tmp_path], include_ci=True)
    assert sorted({p.source for p in with_ci.poems}) == ["ci.song", "poet.song", "poet.tang", "唐诗三百首"]
    assert next(p for p in with_ci.poems if p.source == "ci.song").title == "如梦令"


@pytest.mark.parametrize("name,source", [("poet.tang.1000.json", "poet.tang"), ("poet.song.0.json", "poet.song"),
                                         ("唐诗三百首.json", "唐诗三百首"), ("ci.song.21000.json", "ci.song"),
                                         ("mine.json", "mine")])
def test_source_name_drops_the_file_number(name, source):
    assert source_name(Path(name)) == source


def test_find_files_reads_a_clone_the_folder_itself_or_single_files_in_numeric_order(tmp_path):
    for n in (10000, 0, 2000):
        write_records(tmp_path, f"poet.tang.{n}.json", [])
    (tmp_path / "README.md").write_text("not poems")
    expected = [tmp_path / "全唐诗" / f"poet.tang.{n}.json" for n in (0, 2000, 10000)]
    assert find_files([tmp_path]) == expected
    assert find_files([tmp_path / "全唐诗"]) == expected
    assert find_files([expected[2], expected[0]]) == [expected[0], expected[2]]


def test_the_real_corpus_layout_is_found(tmp_path):
    real = ROOT.parent / "shared" / "corpus" / "chinese-poetry"
    if not real.is_dir():
        pytest.skip("the shared corpus is not here")
    files = find_files([real])
    names = {f.name for f in files}
    assert "poet.tang.0.json" in names and "唐诗三百首.json" in names
    assert not any(f.name.startswith("ci.") for f in files)


@pytest.mark.parametrize("content,problem", [
    ("[{\"paragraphs\": [\"床前", "malformed JSON at line 1"),
    ("{\"paragraphs\": []}", "expected a JSON array"),
    ("", "malformed JSON"),
])
def test_a_malformed_file_raises_a_corpus_error_naming_it(tmp_path, content, problem):
    (tmp_path / "全唐诗").mkdir()
    bad = tmp_path / "全唐诗" / "poet.tang.0.json"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=problem) as info:
        load_corpus([tmp_path])
    assert str(bad) in str(info.value)


def test_a_file_that_is_not_utf8_raises_a_corpus_error(tmp_path):
    (tmp_path / "全唐诗").mkdir()
    (tmp_path / "全唐诗" / "poet.tang.0.json").write_bytes("[\"國\"]".encode("big5"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus([tmp_path])


def test_the_fixture_corpus_yields_every_poem_in_its_form(tiny_corpus):
    corpus = load_corpus([tiny_corpus])
    assert len(corpus.poems) == 400 and not corpus.dropped
    assert {p.form for p in corpus.poems} == {"wujue", "qijue", "wulv", "qilv"}
    assert corpus.regular() == corpus.poems
    assert [p.text for p in corpus.poems[:4]] == make_poems(4, seed=1)


# -- splits and hashes ----------------------------------------------------------------------------------------
def test_a_poem_keeps_its_split_when_the_corpus_grows(tmp_path):
    small = load_corpus([write_corpus(tmp_path / "a", make_poems(300, seed=3))])
    grown = load_corpus([write_corpus(tmp_path / "b", make_poems(300, seed=4) + make_poems(300, seed=3))])
    before = {p.text: split_of(p.text) for p in small.poems}
    after = {p.text: split_of(p.text) for p in grown.poems}
    assert all(after[text] == side for text, side in before.items())
    _, val = split(grown.poems)
    assert {p.text for p in split(small.poems)[1]} <= {p.text for p in val}


@pytest.mark.parametrize("val_percent", [5, 10, 30])
def test_the_validation_share_follows_val_percent(val_percent):
    texts = make_poems(2000, seed=5)
    share = sum(split_of(t, val_percent) == "val" for t in texts) / len(texts)
    assert abs(share - val_percent / 100) < 0.03


def test_split_depends_on_the_text_alone():
    assert all(split_of(t) == split_of(t) for t in make_poems(50))
    assert split_of(JINGYESI, 0) == "train" and split_of(JINGYESI, 100) == "val"


def test_the_corpus_digest_ignores_order_and_changes_with_the_poems():
    from trainer.corpus import Poem

    poems = [Poem(text=t, form="wujue", source="x") for t in make_poems(10)]
    assert Corpus(poems).digest() == Corpus(list(reversed(poems))).digest()
    assert Corpus(poems).digest() != Corpus(poems[:-1]).digest()


# -- corpus stats --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def noisy_corpus(tmp_path_factory):
    root = write_corpus(tmp_path_factory.mktemp("noisy"), make_poems(40, seed=2))
    write_records(root, "唐诗三百首.json", [
        {"paragraphs": [JINGYESI]},
        {"paragraphs": [JINGYESI]},
        {"paragraphs": ["床前□月光，疑是地上霜。"]},
        {"paragraphs": []},
        {"paragraphs": ["一二三四五六，七八九十百千。"]},  # six characters a line: "other"
    ])
    return root


def test_stats_count_poems_per_form_and_source_and_drops_per_reason(noisy_corpus):
    stats = corpus_stats(load_corpus([noisy_corpus]))
    assert stats["poems"] == 42 and stats["regular_poems"] == 41
    assert stats["forms"] == {"wujue": 11, "qijue": 10, "wulv": 10, "qilv": 10, "other": 1}
    assert stats["sources"]["poet.tang"] == {"wujue": 10, "qijue": 10, "wulv": 10, "qilv": 10, "other": 0, "total": 40}
    assert stats["sources"]["唐诗三百首"]["total"] == 2
    assert stats["dropped"] == {"duplicate": 1, "missing characters (□)": 1, "empty": 1}
    assert stats["files"] == 2


def test_stats_count_characters_coverage_and_the_most_frequent(noisy_corpus):
    corpus = load_corpus([noisy_corpus])
    stats = corpus_stats(corpus, top=5)
    han = [ch for p in corpus.poems for ch in p.text if ch not in "，。"]
    assert stats["characters"] == len(han) and stats["vocab_size"] == len(set(han))
    assert [row[1] for row in stats["top"]] == sorted((han.count(c) for c in set(han)), reverse=True)[:5]
    assert stats["top"][0][0] in set(han)
    # Under 1000 distinct characters: every coverage is complete.
    assert stats["coverage"] == {"1000": 1.0, "3000": 1.0, "5000": 1.0}
    assert "coverage" in format_report(stats) and "dropped 3 records" in format_report(stats)


def test_coverage_counts_the_share_of_occurrences_of_the_top_characters():
    from trainer.corpus import Poem
    from trainer.stats import COVERAGE_AT

    # 1200 distinct characters, the first 1000 of them twice: top 1k covers 2000 of 2200 occurrences.
    chars = [chr(0x4E00 + i) for i in range(1200)]
    texts = ["".join(chars), "".join(chars[:1000]) + "，。"]
    stats = corpus_stats(Corpus([Poem(text=t, form="other", source="x") for t in texts]))
    assert COVERAGE_AT == (1000, 3000, 5000)
    assert stats["vocab_size"] == 1200 and stats["characters"] == 2200
    assert stats["coverage"]["1000"] == pytest.approx(2000 / 2200, abs=1e-4)
    assert stats["singletons"] == 200


def test_corpus_stats_command_prints_json_and_draws_the_plot(noisy_corpus, tmp_path, capsys):
    from trainer.__main__ import main

    png = tmp_path / "stats.png"
    assert main(["corpus", "stats", "--corpus", str(noisy_corpus), "--json", "--top", "3", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"poems", "forms", "sources", "dropped", "vocab_size", "coverage", "top"} <= set(out)
    assert len(out["top"]) == 3 and "_counts" not in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000


def test_corpus_stats_command_prints_a_readable_table(noisy_corpus, capsys):
    from trainer.__main__ import main

    assert main(["corpus", "stats", "--corpus", str(noisy_corpus)]) == 0
    out = capsys.readouterr().out
    assert "poet.tang" in out and "唐诗三百首" in out and "most frequent 50" in out


# -- one clear error line from every command ----------------------------------------------------------------
def malformed_json(root: Path) -> Path:
    write_corpus(root, make_poems(20))
    (root / "全唐诗" / "poet.tang.2000.json").write_text('[{"paragraphs": ["床前明月光', encoding="utf-8")
    return root


def missing_directory(root: Path) -> Path:
    return root / "no-such-corpus"


def empty_directory(root: Path) -> Path:
    root.mkdir(exist_ok=True)
    return root


def only_broken_records(root: Path) -> Path:
    return write_records(root, "poet.tang.0.json", [{"paragraphs": []}, {"paragraphs": ["□□□□□，□□□□□。"]}])


def no_regular_poems(root: Path) -> Path:
    return write_records(root, "poet.tang.0.json", [{"paragraphs": ["一二三四五六，七八九十百千。"]}])


BAD_CORPORA = {malformed_json: "malformed JSON", missing_directory: "no such file or directory",
               empty_directory: "no corpus files", only_broken_records: "no usable poem",
               no_regular_poems: "no regular-form poem"}
COMMANDS = {
    "stats": ["corpus", "stats"],
    "train": ["train", "--out", "{tmp}/run", "--embed-dim", "8", "--hidden-dim", "8", "--num-layers", "1",
              "--max-steps", "1", "--min-count", "1", "--no-progress"],
    "bench": ["bench", "--seconds", "0.1", "--embed-dim", "8", "--hidden-dim", "8", "--num-layers", "1",
              "--min-count", "1"],
}


def _argv(command: str, corpus: Path, tmp: Path) -> list[str]:
    return [a.format(tmp=tmp) for a in COMMANDS[command]] + ["--corpus", str(corpus)]


@pytest.mark.parametrize("command,bad", [
    pytest.param(command, bad, id=f"{command}-{bad.__name__}") for command in COMMANDS for bad in BAD_CORPORA
    if not (command == "stats" and bad is no_regular_poems)  # stats describes irregular poems happily
])
def test_every_corpus_command_reports_a_bad_corpus_in_one_line(command, bad, tmp_path, capsys):
    from trainer.__main__ import main

    corpus = bad(tmp_path / "corpus")
    assert main(_argv(command, corpus, tmp_path)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert BAD_CORPORA[bad] in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("problem,expected", [("missing", "cannot read poems"), ("not-utf8", "cannot read poems"),
                                              ("irregular", "no regular-form poem")])
def test_eval_reports_a_bad_poems_file_in_one_line(tiny_checkpoint, tmp_path, capsys, problem, expected):
    from trainer.__main__ import main

    poems = tmp_path / "poems.txt"
    if problem == "not-utf8":
        poems.write_bytes("床前明月光，疑是地上霜。".encode("gb18030"))
    elif problem == "irregular":
        poems.write_text("一二三四五六，七八九十百千。\n", encoding="utf-8")
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--poems", str(poems)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["stats", "train"])
def test_python_m_trainer_prints_one_line_and_no_traceback_for_a_malformed_corpus(command, tmp_path):
    corpus = malformed_json(tmp_path / "corpus")
    proc = subprocess.run([sys.executable, "-m", "trainer", *_argv(command, corpus, tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "poet.tang.2000.json: malformed JSON at line 1" in proc.stderr
