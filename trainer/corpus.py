"""Read the chinese-poetry data set (upstream layout) into clean, simplified, classified poems.

    corpus = load_corpus(["../shared/corpus/chinese-poetry"])
    corpus.poems[0]  # Poem(text="秦川雄帝宅，函谷壮皇居。…", form="wulv", source="poet.tang", ...)
    corpus.dropped   # Counter({"missing characters (□)": 812, ...})

A directory is searched for `全唐诗/poet.*.json` and `全唐诗/唐诗三百首.json` (or those files directly
inside it); `include_ci=True` adds `宋词/ci.song.*.json`. Single files work too.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engine.poem.forms import classify, format_poem, split_lines
from engine.poem.vocab import is_han, to_simplified


class CorpusError(Exception):
    """A corpus that cannot be read: the message is one line naming the path and the problem."""


SHI_PATTERNS = ("poet.*.json", "唐诗三百首.json", "唐詩三百首.json")
CI_PATTERNS = ("ci.song.*.json", "宋词三百首.json")
# Editorial notes and variant readings that upstream keeps inside the text.
_BRACKETED = re.compile(r"[（(〔\[【〖{《][^）)〕\]】〗}》]*[）)〕\]】〗}》]")
_NOISE = re.compile(r"[\s\u3000「」『』“”‘’\"'·•]")
MISSING_MARKS = "□■○〇◻︎"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Poem:
    text: str  # normalised: simplified, regular ，。 layout for regular forms
    form: str  # wujue | qijue | wulv | qilv | other
    source: str  # e.g. "poet.tang", "唐诗三百首", "ci.song"
    author: str = ""
    title: str = ""

    @property
    def lines(self) -> list[str]:
        return split_lines(self.text)


@dataclass
class Corpus:
    poems: list[Poem]
    dropped: Counter = field(default_factory=Counter)  # why records were dropped → count
    files: list[str] = field(default_factory=list)

    def regular(self) -> list[Poem]:
        return [p for p in self.poems if p.form != "other"]

    def digest(self) -> str:
        """A hash of the poem texts (order-free), recorded in checkpoints to tell corpora apart."""
        h = hashlib.sha256()
        for text in sorted(p.text for p in self.poems):
            h.update(text.encode())
            h.update(b"\n")
        return h.hexdigest()[:16]




def source_name(path: Path) -> str:
    """'poet.tang' for poet.tang.1000.json, the stem otherwise."""
    parts = path.stem.split(".")
    return ".".join(parts[:2]) if len(parts) >= 3 and parts[-1].isdigit() else path.stem


def find_files(paths: Iterable[str | Path], include_ci: bool = False) -> list[Path]:
    patterns = SHI_PATTERNS + (CI_PATTERNS if include_ci else ())
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            for pattern in patterns:
                found.extend(sorted(p.glob(pattern)))
                found.extend(sorted(p.glob(f"*/{pattern}")))
        else:
            raise CorpusError(f"{p}: no such file or directory")
    found = sorted(set(found), key=lambda f: (source_name(f), _number(f), str(f)))
    if not found:
        raise CorpusError(f"{', '.join(map(str, paths))}: no corpus files (expected {', '.join(patterns)})")
    return found


def _number(path: Path) -> int:
    last = path.stem.split(".")[-1]
    return int(last) if last.isdigit() else -1


def read_records(path: Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # a 4,300+ digit integer; nesting deeper than the parser's stack
        raise CorpusError(f"{path}: unreadable JSON ({type(e).__name__}: {str(e)[:80]})") from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a JSON array of poems, got {type(data).__name__}")
    return data


def normalise(record) -> tuple[Poem | None, str]:
    """A clean poem from one record, or (None, why it was dropped)."""
    if not isinstance(record, dict):
        return None, "not an object"
    paragraphs = record.get("paragraphs")
    if not isinstance(paragraphs, list) or not all(isinstance(p, str) for p in paragraphs):
        return None, "no paragraphs list"
    raw = "".join(paragraphs)
    if _SURROGATE.search(raw + "".join(str(record.get(k, "")) for k in ("author", "title", "rhythmic"))):
        return None, "invalid text (lone surrogate)"  # OpenCC cannot encode it
    raw = _BRACKETED.sub("", raw)
    raw = _NOISE.sub("", raw)
    if not raw:
        return None, "empty"
    if any(m in raw for m in MISSING_MARKS):
        return None, "missing characters (□)"
    text = to_simplified(raw)
    lines = split_lines(text)
    if not lines:
        return None, "empty"
    if any(not is_han(ch) for line in lines for ch in line):
        return None, "non-Han characters in a line"
    form = classify(lines)
    text = format_poem(lines) if form else text
    author = record.get("author") if isinstance(record.get("author"), str) else ""
    title = record.get("title") or record.get("rhythmic") or ""
    return Poem(text=text, form=form.name if form else "other", source="", author=to_simplified(author),
                title=to_simplified(title) if isinstance(title, str) else ""), ""


def load_corpus(paths: Iterable[str | Path], include_ci: bool = False) -> Corpus:
    """Read, normalise and deduplicate every poem under `paths`. Raises CorpusError on bad input."""
    paths = list(paths)
    files = find_files(paths, include_ci=include_ci)
    poems: list[Poem] = []
    dropped: Counter = Counter()
    seen: set[str] = set()
    for f in files:
        source = source_name(f)
        for record in read_records(f):
            poem, why = normalise(record)
            if poem is None:
                dropped[why] += 1
                continue
            if poem.text in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(poem.text)
            poem.source = source
            poems.append(poem)
    if not poems:
        raise CorpusError(f"{', '.join(map(str, paths))}: the corpus holds no usable poem ({dict(dropped)} dropped)")
    return Corpus(poems=poems, dropped=dropped, files=[str(f) for f in files])


def split_of(text: str, val_percent: int = 5) -> str:
    """'train' or 'val', decided by a hash of the text alone, so a poem keeps its split as the corpus grows."""
    bucket = int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "big") % 100
    return "val" if bucket < val_percent else "train"


def split(poems: Iterable[Poem], val_percent: int = 5) -> tuple[list[Poem], list[Poem]]:
    train, val = [], []
    for p in poems:
        (val if split_of(p.text, val_percent) == "val" else train).append(p)
    return train, val
