"""bot/card.py — poem cards: the text split into columns, the layout (nothing overlaps, nothing is clipped,
right to left), the drawing, the shipped fonts, and `python -m bot card`."""

from __future__ import annotations

import glob
import io
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bot.__main__ import main as bot_main
from bot.card import (
    CARD_CHARS,
    FONTS,
    MAIN_FONT,
    MAX_CHARS,
    Box,
    CardError,
    card_title,
    detect_form,
    font_charset,
    layout_card,
    render_card,
    split_stanzas,
)

ROOT = Path(__file__).resolve().parent.parent
VERSION = "20251127T161800123Z"

SHUIDIAO = ("明月几时有？把酒问青天。不知天上宫阙，今夕是何年。我欲乘风归去，又恐琼楼玉宇，高处不胜寒。起舞弄清影，何似在人间。\n"
            "转朱阁，低绮户，照无眠。不应有恨，何事长向别时圆？人有悲欢离合，月有阴晴圆缺，此事古难全。但愿人长久，千里共婵娟。")
RUMENGLING = "常记溪亭日暮，沉醉不知归路。兴尽晚回舟，误入藕花深处。争渡，争渡，惊起一滩鸥鹭。"
# 25 verses, 200 characters, one stanza: the longest a ci card is made for.
LONG_CI = "，".join(["春风又绿江南岸", "明月何时照我还", "孤帆远影碧空尽", "唯见长江天际流", "千山鸟飞绝"] * 5) + "。"
POEMS = {
    "五绝": ("床前明月光，疑是地上霜。举头望明月，低头思故乡。", "五绝 · 床"),
    "七绝": ("月满山头一点空，不知何事更清风。\n只应此去无人到，犹得当时是主翁。", "七绝 · 月"),
    "五律": ("国破山河在，城春草木深。感时花溅泪，恨别鸟惊心。烽火连三月，家书抵万金。白头搔更短，浑欲不胜簪。", "五律 · 国"),
    "七律": (("风急天高猿啸哀，渚清沙白鸟飞回。无边落木萧萧下，不尽长江滚滚来。万里悲秋常作客，百年多病独登台。"
              "艰难苦恨繁霜鬓，潦倒新停浊酒杯。"), "七律 · 风 秋"),
    "词": (SHUIDIAO, "词 · 水调歌头"),
    "长词": (LONG_CI, "词 · 长调"),
    "小令": (RUMENGLING, "词 · 如梦令"),
}


def han(text: str) -> str:
    return "".join(ch for s in split_stanzas(text) for v in s for ch in v)


def test_verses_split_at_the_marks_and_stanzas_at_newlines():
    assert split_stanzas("明月几时有？把酒问青天。\n\n转朱阁，低绮户，照无眠。") == [
        ["明月几时有", "把酒问青天"], ["转朱阁", "低绮户", "照无眠"]]
    assert split_stanzas("“白日依山尽”, 黄河入海流  欲穷千里目；更上一层楼!") == [
        ["白日依山尽", "黄河入海流", "欲穷千里目", "更上一层楼"]]
    assert split_stanzas(" ，。\n\n ") == []


@pytest.mark.parametrize("name", ["五绝", "七绝", "五律", "七律", "词", "长词", "小令"])
def test_the_form_is_read_from_the_verses(name):
    assert detect_form(split_stanzas(POEMS[name][0])) == {"长词": "词", "小令": "词"}.get(name, name)


def test_titles_name_the_form_and_the_opening_or_keywords():
    assert card_title("七绝", "月") == "七绝 · 月"
    assert card_title("七绝", "月", ["舟", "秋"]) == "七绝 · 月 舟 秋"
    assert card_title("五绝", "", [], "春夏秋冬") == "五绝 · 藏头 春夏秋冬"


def verse_glyphs(layout):
    return [g for g in layout.glyphs if g.role == "verse"]


@pytest.mark.parametrize("name", list(POEMS))
def test_nothing_overlaps_and_nothing_is_clipped(name):
    text, title = POEMS[name]
    layout = layout_card(text, title, "lstm", VERSION)
    frame = layout.border
    assert Box(0, 0, layout.width, layout.height).x1 >= frame.x1 and frame.inside(Box(0, 0, layout.width, layout.height))
    text_boxes = [g.box for g in layout.glyphs if g.role != "seal"] + [box for _, box, _ in layout.small_print]
    for i, box in enumerate(text_boxes):
        assert box.inside(frame), (name, box)
        for other in text_boxes[i + 1:]:
            assert not box.overlaps(other), (name, box, other)
    assert layout.seal.inside(frame) and not any(layout.seal.overlaps(b) for b in text_boxes)
    assert all(g.box.inside(layout.seal) for g in layout.glyphs if g.role == "seal")
    # Readable on a phone: verses at full size, the title at least two thirds of it, the small print ≥ 14 px.
    assert {g.size for g in verse_glyphs(layout)} == {layout.cell} and layout.cell >= 48
    assert min(g.size for g in layout.glyphs if g.role == "title") >= 0.65 * layout.cell
    assert min(size for _, _, size in layout.small_print) >= 14
    assert [s for s, _, _ in layout.small_print] == ["lstm", VERSION]  # whole, not cut


@pytest.mark.parametrize("name", list(POEMS))
def test_columns_read_right_to_left_one_verse_each_tiers_top_to_bottom(name):
    text, title = POEMS[name]
    layout = layout_card(text, title, "lstm", VERSION)
    glyphs = verse_glyphs(layout)
    assert "".join(g.ch for g in glyphs) == han(text)  # every character, in reading order
    verses = [v for s in split_stanzas(text) for v in s]
    columns, i = [], 0
    for verse in verses:  # each verse is one column (none here is longer than a column)
        column = glyphs[i:i + len(verse)]
        assert len({g.x for g in column}) == 1 and [g.y for g in column] == sorted(g.y for g in column)
        columns.append(column)
        i += len(verse)
    for a, b in itertools.pairwise(columns):
        same_tier = a[0].y == b[0].y
        assert (same_tier and b[0].x < a[0].x) or (not same_tier and b[0].y > a[-1].y), name
    title_x = {g.x for g in layout.glyphs if g.role == "title"}
    assert len(title_x) == 1 and title_x.pop() > max(g.x for g in glyphs)  # the title is the rightmost column
    assert layout.seal.x1 < min(g.x for g in glyphs)  # the seal is left of the poem


def test_a_regular_poem_written_a_couplet_a_line_has_no_stanza_break():
    one_line = layout_card(POEMS["七绝"][0].replace("\n", ""), "七绝 · 月")
    couplets = layout_card(POEMS["七绝"][0], "七绝 · 月")
    assert [(g.ch, g.x, g.y) for g in one_line.glyphs] == [(g.ch, g.x, g.y) for g in couplets.glyphs]


def test_a_short_ci_keeps_its_stanzas_apart_by_a_blank_column_and_a_long_one_stacks_them():
    two = layout_card("如梦令，争渡。\n惊起一滩鸥鹭。", "词")
    xs = sorted({g.x for g in verse_glyphs(two)}, reverse=True)
    pitch = xs[0] - xs[1]
    assert xs[1] - xs[2] == pytest.approx(2 * pitch)  # one empty column between the stanzas
    long = layout_card(SHUIDIAO, "词 · 水调歌头")
    first, second = len(han(SHUIDIAO.split("\n")[0])), verse_glyphs(long)
    assert min(g.y for g in second[first:]) > max(g.y for g in second[:first])  # 下片 below 上片
    assert long.width < 1.5 * long.height and long.height < 1.5 * long.width  # not a strip


def test_a_long_title_is_set_smaller_instead_of_growing_the_card():
    short = layout_card(POEMS["七绝"][0], "七绝 · 月")
    long = layout_card(POEMS["七绝"][0], "七绝 · 月满山头一点空")
    assert long.height == short.height
    assert max(g.box.y1 for g in long.glyphs if g.role == "title") <= long.border.y1


def test_a_title_of_many_separators_is_no_taller_than_one():
    # `python -m bot card --title` takes any text: two thousand dots made a card 47,000 pixels tall.
    plain = layout_card(POEMS["七绝"][0], "七绝 · 月")
    dotted = layout_card(POEMS["七绝"][0], "七绝" + " · " * 2000 + "月")
    assert dotted.height == plain.height


def test_render_gives_a_png_of_the_layout_with_a_red_seal():
    card = render_card(*POEMS["七律"], model="lstm", version=VERSION)
    layout = layout_card(*POEMS["七律"], model="lstm", version=VERSION)
    image = Image.open(io.BytesIO(card.png)).convert("RGB")
    assert image.size == (card.width, card.height) == (layout.width, layout.height)
    s = layout.seal
    raw = image.crop((round(s.x0) + 4, round(s.y0) + 4, round(s.x1) - 4, round(s.y1) - 4)).tobytes()
    seal = [raw[i:i + 3] for i in range(0, len(raw), 3)]
    red = sum(1 for r, g, b in seal if r > 150 and g < 90 and b < 90)
    assert red > 0.4 * len(seal)
    assert card.missing == () and card.form == "七律" and len(card.png) < 300_000


def test_a_character_no_font_has_is_drawn_as_an_empty_frame_and_named_not_a_crash():
    # 𰬸 (U+30B38) is in the shipped vocabularies but in no OFL font the subset comes from; 𩕳 is only in
    # the rare-character font.
    card = render_card("𰬸风吹月下，𩕳山照水明。", "五绝")
    assert card.missing == ("𰬸",)
    assert Image.open(io.BytesIO(card.png)).size == (card.width, card.height)
    assert render_card("𰬸风吹月下，𩕳山照水明。", "五绝", fonts=(MAIN_FONT,)).missing == ("𰬸", "𩕳")
    assert set(render_card("🌙风吹月下", "诗", fonts=()).missing) == set("🌙风吹月下诗吟")  # no font at all


@pytest.mark.parametrize("text", ["", " ，。\n", "《》“”"])
def test_a_poem_with_nothing_to_draw_is_refused(text):
    with pytest.raises(CardError, match="empty"):
        layout_card(text)


def test_a_poem_too_long_for_a_card_is_refused():
    with pytest.raises(CardError, match="Too long"):
        layout_card("春" * (MAX_CHARS + 1))


# the fonts

KNOWN_UNCOVERED = {"𰬸"}  # in no OFL font the subset is made from (bot/fonts/README.md)


def test_the_shipped_fonts_hold_every_character_a_model_can_write_and_the_cards_own():
    from engine.model.checkpoint import read_meta

    covered = set().union(*(font_charset(f) for f in FONTS))
    vocab = {t for path in glob.glob(str(ROOT / "engine/checkpoints/*.safetensors"))
             for t in read_meta(path)["vocab"] if len(t) == 1}
    assert len(vocab) > 5000
    lacking = {ch for ch in vocab | set(CARD_CHARS) if ord(ch) not in covered and not ch.isspace()}
    assert lacking == KNOWN_UNCOVERED, "rebuild the fonts: python scripts/subset_font.py"


def test_the_fonts_are_small_and_ship_with_their_licences():
    files = list(MAIN_FONT.parent.iterdir())
    assert sum(f.stat().st_size for f in files) <= 5_000_000
    for font, licence in (("YinshiSerif-Regular.otf", "OFL-NotoSerifCJK.txt"), ("YinshiRare-Regular.ttf", "OFL-HanaMinB.txt")):
        assert (MAIN_FONT.parent / font).is_file()
        text = (MAIN_FONT.parent / licence).read_text(encoding="utf-8")
        assert "SIL OPEN FONT LICENSE Version 1.1" in text and "Reserved Font Name" in text


def test_the_package_build_includes_the_fonts(tmp_path):
    """What pip installs: setuptools' build_py copies the package data pyproject.toml names. Built from a
    copy of the project's packaging and bot/, so no egg-info left by an earlier build can stand in."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "bot", src / "bot", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path / "out")], cwd=src,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    shipped = {p.name for p in (tmp_path / "out" / "bot" / "fonts").iterdir()}
    assert {"YinshiSerif-Regular.otf", "YinshiRare-Regular.ttf", "OFL-NotoSerifCJK.txt", "OFL-HanaMinB.txt"} <= shipped


@pytest.mark.skipif(not (Path("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc").is_file()
                         and Path("/usr/share/fonts/truetype/hanazono/HanaMinB.ttf").is_file()
                         and (ROOT.parent / "shared/corpus/chinese-poetry/宋词").is_dir()),
                    reason="the source fonts (apt-get install fonts-noto-cjk fonts-hanazono) or the ci corpus")
def test_the_subset_script_rebuilds_the_shipped_fonts_byte_for_byte(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/subset_font.py", "--out-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    for font in ("YinshiSerif-Regular.otf", "YinshiRare-Regular.ttf"):
        assert (tmp_path / font).read_bytes() == (MAIN_FONT.parent / font).read_bytes(), font


# python -m bot card

def test_cli_writes_the_card(tmp_path, capsys):
    out = tmp_path / "card.png"
    assert bot_main(["card", POEMS["五律"][0], "--out", str(out), "--title", "五律 · 国", "--model", "lstm",
                     "--version", VERSION]) == 0
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (layout_card(POEMS["五律"][0], "五律 · 国", "lstm", VERSION).width,
                                                   image.size[1])
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("poem", ["", "，。", "《》"])
def test_cli_refuses_an_empty_poem_with_exit_2_and_writes_nothing(tmp_path, capsys, poem):
    assert bot_main(["card", poem, "--out", str(tmp_path / "card.png")]) == 2
    assert "empty" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_cli_refuses_an_unwritable_path_with_exit_2_and_leaves_nothing(tmp_path, capsys, where):
    (tmp_path / "taken").mkdir()
    (tmp_path / "plain").write_text("x")
    out = tmp_path / "taken" if where == "a directory" else tmp_path / "plain" / "card.png"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert bot_main(["card", POEMS["五绝"][0], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no card, no temporary file left


def test_python_m_bot_card_runs_without_settings_and_reads_stdin(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TELEGRAM_BOT_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "bot", "card", "-", "--out", "c.png"], cwd=tmp_path, env=env,
                          input=SHUIDIAO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "c.png").format == "PNG" and "词" in proc.stdout
