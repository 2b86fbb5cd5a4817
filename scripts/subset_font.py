"""Rebuild the poem cards' fonts in bot/fonts/ (bot/card.py): subsets of two OFL fonts holding exactly the
characters the models can write, the characters of the Song ci corpus, and what the card itself prints.

    apt-get install fonts-noto-cjk fonts-hanazono       # Debian bookworm: the two source fonts
    python scripts/subset_font.py                       # writes bot/fonts/YinshiSerif-Regular.otf, YinshiRare-Regular.ttf
    python scripts/subset_font.py --no-ci               # the checkpoints' vocabularies and the card's own characters only

Sources (both SIL Open Font License 1.1; the licences are in bot/fonts/):
- Noto Serif CJK SC Regular, /usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc (Debian fonts-noto-cjk
  1:20220127+repack1-1, upstream https://github.com/notofonts/noto-cjk, Serif 2.001), the face named
  "Noto Serif CJK SC" in the collection: every character it has.
- HanaMinB, /usr/share/fonts/truetype/hanazono/HanaMinB.ttf (Debian fonts-hanazono 20170904-2.1, upstream
  https://glyphwiki.org / http://fonts.jp/hanazono/): the rare characters (CJK extensions B–G) Noto lacks.

The characters: the union of the vocabularies of engine/checkpoints/*.safetensors (read from the checkpoint
header with engine.model.checkpoint.read_meta; no model is built), bot.card.CARD_CHARS (title, seal,
digits, Latin letters, punctuation), and every Han character of the "paragraphs" of the Song ci corpus
(chinese-poetry's 宋词/*.json, converted to simplified with engine.poem.vocab.to_simplified) — the ci
model's vocabulary comes from there. When the two files together would pass --max-bytes (5 MB), the ci
characters are left out and the script says so.

The subsets are renamed (Yinshi Serif, Yinshi Rare) as the OFL asks of modified versions, keep the source
fonts' copyright and licence name records, drop hinting and layout tables (the card draws each character
upright on its own), and keep the source's head timestamps, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NOTO = "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc"
NOTO_FACE = "Noto Serif CJK SC"
HANAZONO = "/usr/share/fonts/truetype/hanazono/HanaMinB.ttf"
CI_CORPUS = ROOT.parent / "shared" / "corpus" / "chinese-poetry" / "宋词"
MAX_BYTES = 5_000_000


def vocab_chars(paths: list[str]) -> set[str]:
    from engine.model.checkpoint import read_meta

    chars = set()
    for path in paths:
        chars |= {t for t in read_meta(path)["vocab"] if len(t) == 1}  # "<pad>", "<qijue>"… are not characters
    return chars


def ci_chars(corpus: Path) -> set[str]:
    from engine.poem.vocab import is_han, to_simplified

    chars = set()
    files = sorted(corpus.glob("*.json"))
    if not files:
        raise SystemExit(f"subset_font: no *.json under {corpus} (the chinese-poetry 宋词 folder); "
                         f"pass --ci-corpus or --no-ci")
    for path in files:
        for poem in json.loads(path.read_text(encoding="utf-8")):
            text = to_simplified("".join(poem.get("paragraphs") or []))
            chars |= {ch for ch in text if is_han(ch)}
    return chars


def open_face(path: str, family: str | None = None):
    from fontTools.ttLib import TTCollection, TTFont

    if not path.endswith((".ttc", ".otc")):
        return TTFont(path, recalcTimestamp=False)
    for i, font in enumerate(TTCollection(path).fonts):
        if font["name"].getDebugName(1) == family:
            return TTFont(path, fontNumber=i, recalcTimestamp=False)
    raise SystemExit(f"subset_font: no face {family!r} in {path}")


def subset(font, chars: set[str], family: str) -> bytes:
    """`font` cut down to `chars` (those it has), renamed `family`; the file's bytes."""
    from fontTools import subset as ft_subset

    options = ft_subset.Options()
    options.layout_features = []  # each character is drawn alone and upright
    options.hinting = False
    options.notdef_outline = True
    options.name_IDs = [0, 7, 13, 14]  # copyright, trademark, licence and its URL; names are set below
    options.name_languages = [0x409]
    options.drop_tables += ["BASE", "GSUB", "GPOS", "GDEF", "vhea", "vmtx", "VORG"]
    subsetter = ft_subset.Subsetter(options)
    subsetter.populate(unicodes=[ord(c) for c in chars])
    subsetter.subset(font)
    name = font["name"]
    postscript = family.replace(" ", "") + "-Regular"
    for name_id, value in {1: family, 2: "Regular", 3: f"{postscript};subset", 4: f"{family} Regular",
                           5: "Version 1.0", 6: postscript}.items():
        name.setName(value, name_id, 3, 1, 0x409)
    font.recalcTimestamp = False
    out = io.BytesIO()
    font.save(out)
    return out.getvalue()


def build(chars: set[str], noto: str, hanazono: str) -> tuple[bytes, bytes, set[str]]:
    """(main font, rare font, characters neither has)."""
    main = open_face(noto, NOTO_FACE)
    main_cmap = set(main.getBestCmap())
    rare_chars = {c for c in chars if ord(c) not in main_cmap}
    rare = open_face(hanazono)
    rare_cmap = set(rare.getBestCmap())
    missing = {c for c in rare_chars if ord(c) not in rare_cmap}
    return (subset(main, chars, "Yinshi Serif"), subset(rare, rare_chars - missing, "Yinshi Rare"), missing)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noto", default=NOTO, help=f"Noto Serif CJK (.ttc or the SC .otf) (default {NOTO})")
    parser.add_argument("--hanazono", default=HANAZONO, help=f"HanaMinB.ttf (default {HANAZONO})")
    parser.add_argument("--checkpoints", nargs="+", default=sorted(glob.glob(str(ROOT / "engine/checkpoints/*.safetensors"))))
    parser.add_argument("--ci-corpus", type=Path, default=CI_CORPUS, help=f"chinese-poetry's 宋词 folder (default {CI_CORPUS})")
    parser.add_argument("--no-ci", action="store_true", help="leave the Song ci characters out")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bot" / "fonts")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    args = parser.parse_args(argv)

    from bot.card import CARD_CHARS, MAIN_FONT, RARE_FONT

    base = vocab_chars(args.checkpoints) | set(CARD_CHARS)
    print(f"vocabularies of {len(args.checkpoints)} checkpoints + the card's own: {len(base)} characters")
    chars = base
    if not args.no_ci:
        ci = ci_chars(args.ci_corpus)
        chars = base | ci
        print(f"Song ci corpus: {len(ci)} Han characters, {len(ci - base)} not in the vocabularies")
    main_font, rare_font, missing = build(chars, args.noto, args.hanazono)
    if len(main_font) + len(rare_font) > args.max_bytes and chars is not base:
        print(f"{len(main_font) + len(rare_font)} bytes with the ci characters: over {args.max_bytes}; "
              f"vocabularies only")
        chars = base
        main_font, rare_font, missing = build(chars, args.noto, args.hanazono)
    if len(main_font) + len(rare_font) > args.max_bytes:
        raise SystemExit(f"subset_font: {len(main_font) + len(rare_font)} bytes, over {args.max_bytes}")
    from engine.files import atomic_write_bytes

    for path, data in ((MAIN_FONT, main_font), (RARE_FONT, rare_font)):
        path = args.out_dir / path.name
        atomic_write_bytes(path, data)
        print(f"{path}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    print(f"{len(chars)} characters; in neither source font ({len(missing)}, drawn as empty frames): "
          f"{''.join(sorted(missing))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
