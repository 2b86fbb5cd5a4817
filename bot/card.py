"""Poem cards: a poem as a PNG in the classical layout, rendered with Pillow. No Telegram in here.

    card = render_card("床前明月光，疑是地上霜。举头望明月，低头思故乡。", title="五绝 · 床",
                       model="lstm", version="20251127T161800123Z")
    card.png        # PNG bytes
    card.missing    # characters no shipped font has (each drawn as an empty frame), normally ()
    python -m bot card "床前明月光，疑是地上霜。举头望明月，低头思故乡。" --out card.png

The layout (`layout_card`, plain geometry that the tests check: nothing overlaps, nothing is clipped):

- vertical columns read right to left on xuan-paper ground, between thin vermilion rules (朱丝栏);
- the rightmost column is the title (form · opening or keywords, e.g. "七绝 · 月");
- then one column per verse: the text is split at ，。、？！；： (and spaces); the marks themselves are not
  drawn, as in a classical manuscript. A verse longer than MAX_ROWS characters continues in the next column;
- a newline is a stanza break (词: 上片/下片): a blank column between stanzas, or, when the columns would
  make the card too wide (over MAX_TIER_COLUMNS), the stanzas stacked in tiers read top to bottom, each
  tier right to left. A regular 绝句 or 律诗 has no stanzas, so its newlines (one couplet a line, as the bot
  writes it) are ignored;
- the leftmost column is the colophon: the model and its version in small print, turned to read top to
  bottom, and below it a red seal 吟诗.

Fonts: bot/fonts/ holds subsets of two OFL fonts (see bot/fonts/README.md and scripts/subset_font.py): Noto
Serif CJK SC for everything it has, HanaMinB for the rare characters it lacks. A character neither has is
drawn as an empty frame and listed in `Card.missing`; it never fails a card.
"""

from __future__ import annotations

import functools
import io
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

FONT_DIR = Path(__file__).resolve().parent / "fonts"
MAIN_FONT = FONT_DIR / "YinshiSerif-Regular.otf"  # Noto Serif CJK SC, subset
RARE_FONT = FONT_DIR / "YinshiRare-Regular.ttf"  # HanaMinB, subset: rare characters Noto lacks
FONTS = (MAIN_FONT, RARE_FONT)  # tried in this order for each character

SEAL = "吟诗"
VERSE_MARKS = "，。、？！；：,.?!;:"  # each ends a verse (one column)
DROPPED = "“”‘’「」『』《》〈〉（）()\"'…—-·・"  # quotes, brackets and dashes: not drawn
TITLE_SEPARATORS = "·・•"  # drawn as a dot in the title column
# Every character the card itself may print besides the poem: the subset font must hold these.
FORM_NAMES = "五绝七绝五律七律词诗藏头"
CARD_CHARS = (SEAL + FORM_NAMES + "、·" + VERSE_MARKS + string.ascii_letters + string.digits
              + " -_.:/+()#…")

MAX_CHARS = 400  # Han characters on one card
MAX_ROWS = 12  # characters in a column; a longer verse continues in the next column
MAX_TIER_COLUMNS = 12  # body columns side by side before stanzas stack in tiers
MAX_COLUMNS = 60  # body columns in all
MAX_TITLE = 14  # title characters shown (longer titles end in …)
TITLE_MIN_SCALE = 0.65  # a long title's characters shrink to this fraction of the verses' at most

# Colours: xuan paper, ink, vermilion rules and border, seal red.
PAPER = (245, 238, 220)
INK = (38, 34, 30)
GREY = (96, 86, 76)
RULE = (214, 170, 150)
BORDER = (150, 48, 36)
SEAL_RED = (190, 38, 30)


class CardError(ValueError):
    """The text cannot be made into a card; the message says why, for the user."""


# the text


def split_stanzas(text: str) -> list[list[str]]:
    """The poem as stanzas of verses. Newlines separate stanzas, verse marks (and spaces) verses; quotes,
    brackets and dashes are dropped; empty verses and stanzas vanish."""
    stanzas = []
    for raw in re.split(r"[\r\n\u2028\u2029]+", text):
        verses = []
        for verse in re.split(f"[{re.escape(VERSE_MARKS)}\\s\u3000]+", raw):
            verse = "".join(ch for ch in verse if ch not in DROPPED and ch.isprintable())
            if verse:
                verses.append(verse)
        if verses:
            stanzas.append(verses)
    return stanzas


def detect_form(stanzas: list[list[str]]) -> str:
    """五绝 七绝 五律 七律 for 4 or 8 verses of 5 or 7 characters, 词 for several stanzas or uneven verses,
    else 诗."""
    verses = [v for s in stanzas for v in s]
    lengths = {len(v) for v in verses}
    if len(lengths) == 1 and len(verses) in (4, 8) and lengths <= {5, 7}:
        return ("五" if 5 in lengths else "七") + ("绝" if len(verses) == 4 else "律")
    if len(stanzas) > 1 or len(lengths) > 1:
        return "词"
    return "诗"


def regular_verses(stanzas: list[list[str]]) -> list[list[str]]:
    """A 绝句 or 律诗 is one stanza however its lines were broken (the bot writes one couplet a line)."""
    return [[v for s in stanzas for v in s]] if detect_form(stanzas) not in ("词", "诗") else stanzas


def card_title(form: str, opening: str = "", keywords=(), acrostic: str | None = None,
               rhymes: str | None = None) -> str:
    """The title column: "七绝 · 月", "七绝 · 月 舟 秋" (opening and keywords), "七绝 · 藏头 春夏秋冬",
    "五绝 · 次韵 霜乡" (the rhymes it answers)."""
    if acrostic:
        return f"{form} · 藏头 {acrostic}"
    if rhymes:
        return f"{form} · 次韵 {rhymes}"
    words = [w for w in [opening, *keywords] if w]
    return f"{form} · {' '.join(words)}" if words else form


def default_title(text: str) -> str:
    """A title for a bare poem: its form and its opening character, as the bot titles its own ("五绝 · 床")."""
    stanzas = split_stanzas(text)
    if not stanzas:
        return ""
    return card_title(detect_form(stanzas), stanzas[0][0][0])


# fonts


@functools.cache
def font_charset(path: Path) -> frozenset[int]:
    """The code points a font file maps (its cmap); empty when the file is missing."""
    from fontTools.ttLib import TTFont

    if not Path(path).is_file():
        return frozenset()
    with TTFont(str(path), lazy=True) as font:
        return frozenset(font.getBestCmap())


@functools.cache
def em_centre(path: Path) -> float:
    """How far above the baseline the ideographic em box's centre sits, in ems (≈0.38 for Noto CJK)."""
    from fontTools.ttLib import TTFont

    with TTFont(str(path), lazy=True) as font:
        os2 = font["OS/2"]
        return (os2.sTypoAscender + os2.sTypoDescender) / 2 / font["head"].unitsPerEm


@functools.lru_cache(maxsize=64)
def _pil_font(path: Path, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(path), size, layout_engine=ImageFont.Layout.BASIC)


def font_for(ch: str, fonts=FONTS) -> Path | None:
    """The first font that has `ch`, or None."""
    return next((f for f in fonts if ord(ch) in font_charset(Path(f))), None) if len(ch) == 1 else None


# the layout


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float

    def overlaps(self, other: Box) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1

    def inside(self, other: Box) -> bool:
        return other.x0 <= self.x0 and other.y0 <= self.y0 and self.x1 <= other.x1 and self.y1 <= other.y1


@dataclass(frozen=True)
class Glyph:
    """One upright character centred at (x, y) in a `size`-pixel em box."""

    ch: str
    x: float
    y: float
    size: int
    role: str  # title | verse | seal

    @property
    def box(self) -> Box:
        half = self.size / 2
        return Box(self.x - half, self.y - half, self.x + half, self.y + half)


@dataclass
class Layout:
    width: int
    height: int
    cell: int  # the verse characters' em size in pixels
    border: Box  # the double frame
    columns: list[Box] = field(default_factory=list)  # title first, then the verse columns, in reading order
    glyphs: list[Glyph] = field(default_factory=list)
    dots: list[tuple[float, float, float]] = field(default_factory=list)  # title separators: (x, y, radius)
    rules: list[tuple[float, float, float, float]] = field(default_factory=list)  # thin lines (x0, y0, x1, y1)
    small_print: list[tuple[str, Box, int]] = field(default_factory=list)  # (text, its box, font size), turned
    seal: Box | None = None
    form: str = ""


def _columns_of(stanzas: list[list[str]]) -> list[list[str]]:
    """Each stanza's columns: a verse a column, longer verses continued in the next."""
    return [[verse[i:i + MAX_ROWS] for verse in stanza for i in range(0, len(verse), MAX_ROWS)]
            for stanza in stanzas]


def _tiers(stanza_columns: list[list[str]]) -> list[list[str | None]]:
    """Body columns in tiers (None = the blank column between stanzas). One tier when it fits in
    MAX_TIER_COLUMNS; else each stanza starts a tier (several stanzas share one where they fit), and a
    stanza too wide for one tier is split into equal tiers."""
    flat: list[str | None] = []
    for i, cols in enumerate(stanza_columns):
        flat += ([None] if i else []) + cols
    if len(flat) <= MAX_TIER_COLUMNS:
        return [flat]
    chunks = []
    for cols in stanza_columns:
        parts = math.ceil(len(cols) / MAX_TIER_COLUMNS)
        size = math.ceil(len(cols) / parts)
        chunks += [cols[i:i + size] for i in range(0, len(cols), size)]
    tiers: list[list[str | None]] = []
    for chunk in chunks:
        if tiers and len(tiers[-1]) + 1 + len(chunk) <= MAX_TIER_COLUMNS:
            tiers[-1] += [None] + chunk
        else:
            tiers.append(list(chunk))
    return tiers


def layout_card(text: str, title: str | None = None, model: str = "", version: str = "",
                cell: int = 60) -> Layout:
    """Where everything on the card goes. Raises CardError for text with nothing to draw or too much."""
    stanzas = split_stanzas(text or "")
    if not stanzas:
        raise CardError("没有可写在卡片上的字。/ The poem is empty: nothing to put on a card.")
    stanzas = regular_verses(stanzas)
    count = sum(len(v) for s in stanzas for v in s)
    if count > MAX_CHARS:
        raise CardError(f"诗太长，卡片最多 {MAX_CHARS} 字。/ Too long for a card: {count} characters, "
                        f"at most {MAX_CHARS}.")
    form = detect_form(stanzas)
    tiers = _tiers(_columns_of(stanzas))
    if sum(len(t) for t in tiers) > MAX_COLUMNS:
        raise CardError(f"诗句太多，卡片最多 {MAX_COLUMNS} 列。/ Too many verses for a card (at most "
                        f"{MAX_COLUMNS} columns).")
    title = default_title(text) if title is None else title
    title_items = _title_items(title)

    row = round(cell * 1.2)  # vertical advance of a character
    pitch = round(cell * 1.75)  # column pitch
    pad = round(cell * 0.55)  # inside the frame, around the text area
    margin = round(cell * 0.6)  # paper outside the frame
    tier_gap = round(cell * 0.9)
    small = max(16, round(cell * 0.33))
    seal_w, seal_h = round(cell * 1.05), round(cell * 2.0)

    rows = max(len(c) for t in tiers for c in t if c)
    tier_h = rows * row
    tier_count, tier_cols = len(tiers), max(len(t) for t in tiers)
    poem_h = tier_count * tier_h + (tier_count - 1) * tier_gap
    # A title longer than the poem's columns is set smaller (down to TITLE_MIN_SCALE) before the card grows.
    title_h = sum(1 if item else 0.5 for item in title_items) * row
    title_scale = max(TITLE_MIN_SCALE, min(1.0, poem_h / title_h)) if title_h else 1.0
    # The colophon needs room for the seal and a little small print beside the shortest poem.
    body_h = max(poem_h, math.ceil(title_h * title_scale), seal_h + 5 * small + row // 2)
    n_cols = 1 + tier_cols + 1  # title, body, colophon
    inner = Box(margin + pad, margin + pad, margin + pad + n_cols * pitch, margin + pad + body_h)
    border = Box(margin, margin, inner.x1 + pad, inner.y1 + pad)
    layout = Layout(width=round(border.x1 + margin), height=round(border.y1 + margin), cell=cell,
                    border=border, form=form)

    def column_x(i: int) -> float:  # the centre of column i, counted from the right (0 = title)
        return inner.x1 - (i + 0.5) * pitch

    # Title column: characters and separator dots from the top.
    x, y = column_x(0), inner.y0
    layout.columns.append(Box(x - pitch / 2, inner.y0, x + pitch / 2, inner.y1))
    t_row, t_cell = row * title_scale, round(cell * title_scale)
    for item in title_items:
        if item is None:
            layout.dots.append((x, y + t_row / 4, max(3, t_cell * 0.07)))
            y += t_row / 2
        elif item == "":  # between words: a half-row gap
            y += t_row / 2
        else:
            layout.glyphs.append(Glyph(item, x, y + t_row / 2, t_cell, "title"))
            y += t_row
    # Body: each tier right to left, tiers top to bottom; a rule between neighbouring columns.
    for t, tier in enumerate(tiers):
        top = inner.y0 + t * (tier_h + tier_gap)
        if t:
            mid = top - tier_gap / 2
            layout.rules.append((inner.x1 - pitch, mid, inner.x1 - (1 + tier_cols) * pitch, mid))
        for c, column in enumerate(tier):
            x = column_x(1 + c)
            if column is None:
                continue
            layout.columns.append(Box(x - pitch / 2, top, x + pitch / 2, top + tier_h))
            for r, ch in enumerate(column):
                layout.glyphs.append(Glyph(ch, x, top + (r + 0.5) * row, cell, "verse"))
    for i in range(1, n_cols):  # vertical rules between all columns, full height
        rx = inner.x1 - i * pitch
        layout.rules.append((rx, inner.y0, rx, inner.y1))
    # Colophon: the seal at the bottom and, just above it, the small print (model right, version left),
    # turned to read top to bottom as Latin does in vertical text.
    x = column_x(n_cols - 1)
    seal = Box(x - seal_w / 2, inner.y1 - seal_h, x + seal_w / 2, inner.y1)
    layout.seal = seal
    layout.glyphs += [Glyph(SEAL[0], x, seal.y0 + seal_h * 0.27, round(cell * 0.82), "seal"),
                      Glyph(SEAL[1], x, seal.y0 + seal_h * 0.73, round(cell * 0.82), "seal")]
    bottom = seal.y0 - cell * 0.3
    room = bottom - inner.y0  # the length the turned small print may take
    lines = [s for s in (model, version) if s]
    if lines:
        size = small
        while size > 10 and max(_text_width(s, size) for s in lines) > room:
            size -= 1
        line_gap = size * 1.35
        right = x + line_gap * len(lines) / 2
        for i, s in enumerate(lines):
            s = _fit(s, size, room)
            length = _text_width(s, size)
            left = right - (i + 1) * line_gap + (line_gap - size) / 2
            layout.small_print.append((s, Box(left, bottom - length, left + size, bottom), size))
    return layout


def _title_items(title: str) -> list[str | None]:
    """The title's characters, None for a separator dot and "" for a gap between words (a space); long
    titles end in …, so a title is never taller than MAX_TITLE characters and the dots between them."""
    items: list[str | None] = []
    for ch in title:
        if ch in TITLE_SEPARATORS:
            while items and items[-1] == "":
                items.pop()
            if items and items[-1] is not None:  # one dot between words, however many were typed
                items.append(None)
        elif ch.isspace():
            if items and items[-1] not in (None, ""):
                items.append("")
        elif ch.isprintable():
            items.append(ch)
    while items and items[-1] in (None, ""):
        items.pop()
    while items and items[0] in (None, ""):
        items.pop(0)
    if sum(bool(i) for i in items) > MAX_TITLE:
        kept, n = [], 0
        for item in items:
            n += bool(item)
            if n >= MAX_TITLE:
                break
            kept.append(item)
        items = kept + ["…"]
    return items


def _text_width(text: str, size: int) -> float:
    font = _pil_font(MAIN_FONT, size)
    return font.getlength(text)


def _fit(text: str, size: int, room: float) -> str:
    """`text` cut (ending in …) to fit `room` pixels at `size`."""
    if _text_width(text, size) <= room:
        return text
    while text and _text_width(text + "…", size) > room:
        text = text[:-1]
    return text + "…"


# drawing


@dataclass(frozen=True)
class Card:
    png: bytes
    width: int
    height: int
    form: str
    missing: tuple[str, ...] = ()  # characters no font had: drawn as empty frames


def draw_layout(layout: Layout, fonts=FONTS):
    """The card as a Pillow image; returns (image, missing characters)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (layout.width, layout.height), PAPER)
    draw = ImageDraw.Draw(img)
    b, cell = layout.border, layout.cell
    thick = max(3, round(cell * 0.06))
    draw.rectangle((b.x0, b.y0, b.x1, b.y1), outline=BORDER, width=thick)
    inset = thick + max(3, round(cell * 0.06))
    draw.rectangle((b.x0 + inset, b.y0 + inset, b.x1 - inset, b.y1 - inset), outline=BORDER, width=1)
    for x0, y0, x1, y1 in layout.rules:
        draw.line((x0, y0, x1, y1), fill=RULE, width=1)
    if layout.seal is not None:
        s = layout.seal
        draw.rounded_rectangle((s.x0, s.y0, s.x1, s.y1), radius=max(2, cell * 0.08), fill=SEAL_RED)
    for x, y, r in layout.dots:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=INK)
    missing = []
    for g in layout.glyphs:
        path = font_for(g.ch, fonts)
        colour = PAPER if g.role == "seal" else INK
        if path is None:
            missing.append(g.ch)
            box, inset_px = g.box, g.size * 0.2
            draw.rectangle((box.x0 + inset_px, box.y0 + inset_px, box.x1 - inset_px, box.y1 - inset_px),
                           outline=GREY, width=max(1, g.size // 30))
            continue
        font = _pil_font(Path(path), g.size)
        baseline = g.y + em_centre(Path(path)) * g.size
        stroke = 1 if g.role in ("title", "seal") else 0  # a touch bolder
        draw.text((g.x, baseline), g.ch, font=font, fill=colour, anchor="ms", stroke_width=stroke,
                  stroke_fill=colour)
    for text, box, size in layout.small_print:
        # Drawn across, then turned a quarter clockwise to read top to bottom (Latin in vertical text).
        font = _pil_font(MAIN_FONT, size)
        strip = Image.new("L", (math.ceil(box.y1 - box.y0) + 2, size + 4), 0)
        ImageDraw.Draw(strip).text((1, (size + 4) / 2), text, font=font, fill=255, anchor="lm")
        strip = strip.rotate(-90, expand=True)
        img.paste(Image.new("RGB", strip.size, GREY), (round(box.x0 - 2), round(box.y0)), strip)
    return img, tuple(dict.fromkeys(missing))


def render_card(text: str, title: str | None = None, model: str = "", version: str = "", *, cell: int = 60,
                fonts=FONTS) -> Card:
    """The card for `text` as PNG bytes. `title` None: the form and the first verse. Raises CardError for
    text with nothing to draw or too much of it."""
    layout = layout_card(text, title, model, version, cell=cell)
    img, missing = draw_layout(layout, fonts)
    out = io.BytesIO()
    # Few colours (paper, ink, reds, their blends): a palette PNG is a third of the size and looks the same.
    from PIL import Image

    img.quantize(colors=48, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, format="PNG", optimize=True)
    return Card(png=out.getvalue(), width=layout.width, height=layout.height, form=layout.form, missing=missing)


def write_card(card: Card, path) -> Path:
    """Write the PNG atomically: the file is the whole card or not there (and no partial file is left)."""
    from engine.files import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, card.png)
    return path
