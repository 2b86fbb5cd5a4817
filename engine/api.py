"""What a caller hands the engine and gets back — the same for the in-process engine and the HTTP client.

    request = PoemRequest.from_dict({"prompt": "月", "form": "qijue", "mode": "beam", "beam_width": 5})
    result = await engine.generate(request)   # -> PoemResult
    result.poem                                 # "月落乌啼霜满天，…"

Every invalid field raises RequestError(code, field, message) before anything is queued; the HTTP
service turns it into a 400 with the same code and message.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Protocol

from engine.errors import RequestError
from engine.poem.forms import DEFAULT_FORM, FORMS, LINE_BREAKS, Layout, parse_form, rhyme_positions
from engine.poem.tunes import TUNES, parse_tune
from engine.poem.vocab import is_han

MODES = ("greedy", "sample", "beam")
# The models served when ENGINE_MODELS is not set, the default first: lstm-large reads best, ci writes 词.
DEFAULT_MODELS = ("lstm-large", "lstm", "gru", "ci")
CI_NAMES = ("ci", "词", "詞")
MAX_BEAM_WIDTH = 16
DEFAULT_TEMPERATURE = 0.6  # sample mode; read better than 0.8 in two blind panels (docs/PERFORMANCE.md)
MAX_PROMPT = 14
MAX_KEYWORDS = 4
MAX_KEYWORD_LEN = 2  # a keyword stays inside one line, so it must be short enough to fit wherever it goes


@dataclass
class PoemRequest:
    prompt: str = ""  # the poem's opening characters, 0–14 Han characters (traditional is converted)
    form: str = DEFAULT_FORM  # wujue | qijue | wulv | qilv (aliases such as 七绝 accepted) | ci (词, with `tune`)
    tune: str | None = None  # the 词 tune (词牌) when form is ci, e.g. 浣溪沙; GET /v1/tunes lists them
    mode: str = "sample"  # greedy | sample | beam
    beam_width: int = 5  # 1–16, beam mode only
    temperature: float = DEFAULT_TEMPERATURE  # (0, 2], sample mode
    top_p: float = 0.9  # (0, 1], sample mode
    top_k: int = 0  # 0 = off, sample mode
    acrostic: str | None = None  # one character per line (4 or 8), excludes prompt
    keywords: list[str] = field(default_factory=list)  # up to 4 words of 1–2 Han characters, each somewhere in the poem
    # 次韵: the characters that end the rhyming lines, in order: lines 2, 4, … (2 or 4), with line 1's first
    # when it rhymes too (3 or 5). The regular forms only; each a level-tone (平) character, none twice.
    rhymes: str | None = None
    rhyme: bool = True
    tone: bool = True
    model: str | None = None  # a loaded model's name; None = the default model
    seed: int | None = None  # same request + seed → same poem
    timeout: float | None = None  # seconds the caller will wait; rows are freed after it

    @classmethod
    def from_dict(cls, data) -> PoemRequest:
        """Validate a JSON object; raises RequestError naming the first bad field."""
        if not isinstance(data, dict):
            raise RequestError("bad_request", None, "the body must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RequestError("unknown_field", unknown[0], f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        req = cls(**{k: v for k, v in data.items() if v is not None or k in ("acrostic", "tune", "model", "seed", "timeout", "rhymes")})
        req.validate()
        return req

    def validate(self) -> PoemRequest:
        """Check every field and normalise `form`, `prompt`, `acrostic` and `keywords`; raises RequestError. The one
        validation of a request: the bot, the HTTP service and the engine all rely on it. What only a
        model can tell (whether it knows a character) is checked when the plan is made."""
        _check_text("prompt", self.prompt)
        # Line marks in a prompt are implied by the form ("床前明月光，疑是" is the prompt 床前明月光疑是).
        self.prompt = _han_text("prompt", self.prompt, drop=LINE_BREAKS)
        if len(self.prompt) > MAX_PROMPT:
            raise RequestError("prompt_too_long", "prompt", f"prompt has {len(self.prompt)} characters; at most {MAX_PROMPT}")
        _check_text("form", self.form)
        if self.form.strip().lower() in CI_NAMES:
            self.form = "ci"
            if self.tune is None:
                raise RequestError("bad_tune", "tune", f"a 词 needs its tune, e.g. \"tune\": \"浣溪沙\" "
                                                       f"({len(TUNES)} tunes: GET /v1/tunes)")
            _check_text("tune", self.tune)
            try:
                self.tune = parse_tune(self.tune).name
            except ValueError as e:
                raise RequestError("bad_tune", "tune", str(e)) from None
        else:
            try:
                self.form = parse_form(self.form).name
            except ValueError as e:
                raise RequestError("bad_form", "form", f"{e}, ci (词, with a tune)") from None
            if self.tune is not None:
                raise RequestError("bad_tune", "tune", f"tune is for form ci (词); a {self.form} has no tune")
        _check_text("mode", self.mode)
        if self.mode not in MODES:
            raise RequestError("bad_mode", "mode", f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check_int("beam_width", self.beam_width, 1, MAX_BEAM_WIDTH)
        _check_float("temperature", self.temperature, 0.0, 2.0, low_open=True)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("top_k", self.top_k, 0, 100_000)
        if self.acrostic is not None:
            _check_text("acrostic", self.acrostic)
            self.acrostic = _han_text("acrostic", self.acrostic)
            if self.form == "ci":
                raise RequestError("bad_acrostic", "acrostic", "an acrostic is for the regular forms; a 词 takes a "
                                                               "prompt or keywords")
            n = FORMS[self.form].num_lines
            if len(self.acrostic) not in (4, 8):
                raise RequestError("bad_acrostic", "acrostic", f"acrostic needs 4 or 8 characters (one per line), got {len(self.acrostic)}")
            if len(self.acrostic) != n:
                raise RequestError("bad_acrostic", "acrostic",
                                   f"acrostic has {len(self.acrostic)} characters but {self.form} has {n} lines")
            if self.prompt:
                raise RequestError("bad_acrostic", "acrostic", "give either prompt or acrostic, not both")
        if self.rhymes is not None:
            _check_text("rhymes", self.rhymes)
            self.rhymes = _han_text("rhymes", self.rhymes, drop=LINE_BREAKS)
            if self.form == "ci":
                raise RequestError("bad_rhymes", "rhymes", "rhymes (次韵) are for the regular forms; a 词 rhymes as "
                                                           "its tune says")
            n = FORMS[self.form].num_lines // 2
            if len(self.rhymes) not in (n, n + 1):
                raise RequestError("bad_rhymes", "rhymes", f"a {self.form} rhymes {n} lines (2, 4…): rhymes needs {n} "
                                                           f"characters, or {n + 1} with line 1's first; got "
                                                           f"{len(self.rhymes)}")
        self.keywords = _keywords(self.keywords)
        _check_type("rhyme", self.rhyme, bool)
        _check_type("tone", self.tone, bool)
        if self.model is not None:
            _check_text("model", self.model)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.timeout is not None:
            _check_float("timeout", self.timeout, 0.0, 3600.0, low_open=True)
        layout = self.layout()
        if len(self.prompt) > layout.num_chars:
            raise RequestError("prompt_too_long", "prompt", f"prompt has {len(self.prompt)} characters; a "
                                                            f"{self.tune or self.form} holds {layout.num_chars}")
        if self.keywords:
            _check_keyword_room(layout, self.tune or self.form, self.prompt, self.acrostic, self.keywords,
                                rhyme_positions(FORMS[self.form], len(self.rhymes)) if self.rhymes else [])
        return self

    def layout(self) -> Layout:
        """Where the lines of the poem asked for lie (after `validate`)."""
        return parse_tune(self.tune).layout if self.form == "ci" else FORMS[self.form].layout

    def to_dict(self) -> dict:
        # NOTE: no "tune" key for a regular form, so an engine from before 词 still accepts the request.
        # Nor "rhymes" when there are none, for an engine from before 次韵.
        return {k: v for k, v in asdict(self).items() if not (k in ("tune", "rhymes") and v is None)}


def _check_type(name, value, kind):
    # bool is an int in Python; a JSON true must not pass as a beam width.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RequestError("bad_type", name, f"{name} must be {kind.__name__}, got {type(value).__name__}")


def _check_text(name, value):
    """A str that is text: lone surrogates ("\\ud800" in JSON) are valid Python strings but cannot be encoded,
    and would fail later, deep in OpenCC or the HTTP client, instead of here with the field named."""
    _check_type(name, value, str)
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        raise RequestError("bad_character", name, f"{name} holds an unpaired surrogate, not a character")


def _han_text(name: str, value: str, drop: str = "") -> str:
    """`value` without whitespace (and `drop`); RequestError unless every character left is a Han character."""
    text = "".join(ch for ch in value if not ch.isspace() and ch not in drop)
    for ch in text:
        if not is_han(ch):
            raise RequestError("bad_character", name,
                               f"{name} holds {ch!r}, which is not a Chinese character; use Han characters only")
    return text


def _keywords(value) -> list[str]:
    """`keywords` as a list of 1–2 Han characters each (whitespace dropped); RequestError otherwise."""
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise RequestError("bad_type", "keywords", f"keywords must be a list of words, got {type(value).__name__}")
    if len(value) > MAX_KEYWORDS:
        raise RequestError("bad_keywords", "keywords", f"at most {MAX_KEYWORDS} keywords, got {len(value)}")
    out = []
    for word in value:
        if not isinstance(word, str):
            raise RequestError("bad_keywords", "keywords", f"each keyword must be a string, got {type(word).__name__}")
        if any("\ud800" <= ch <= "\udfff" for ch in word):
            raise RequestError("bad_keywords", "keywords", "a keyword holds an unpaired surrogate, not a character")
        text = "".join(ch for ch in word if not ch.isspace())
        shown = text if len(text) <= 8 else text[:8] + "…"  # echoed back: keep a huge one short
        for ch in text:
            if not is_han(ch):
                raise RequestError("bad_keywords", "keywords", f"keyword {shown!r} holds {ch!r}, which is not a "
                                   f"Chinese character; use Han characters only")
        if not 1 <= len(text) <= MAX_KEYWORD_LEN:
            raise RequestError("bad_keywords", "keywords",
                               f"each keyword is 1 or {MAX_KEYWORD_LEN} Han characters; {shown!r} has {len(text)}")
        out.append(text)
    return out


def keywords_to_place(keywords: list[str], prompt: str, acrostic: str | None, layout: Layout) -> list[str]:
    """The keywords that still need a place, in request order. One already in the poem is left out: inside
    one line of the prompt, an acrostic head, or inside a longer keyword (or the same one given earlier)."""
    chunks, rest = [], prompt
    for n in layout.line_lengths:
        if not rest:
            break
        chunks.append(rest[:n])
        rest = rest[n:]
    out = []
    for i, word in enumerate(keywords):
        if any(word in chunk for chunk in chunks) or (acrostic and len(word) == 1 and word in acrostic):
            continue
        if any(word in other and (len(other) > len(word) or (other == word and j < i)) for j, other in enumerate(keywords)):
            continue
        out.append(word)
    return out


def keywords_fit(free: set[int], lengths: list[int]) -> bool:
    """Can words of these lengths (1 or 2) take distinct `free` text positions, each 2-character word two
    neighbours in one line? Exact: 2-character words packed from each run's start use floor(run / 2) pairs
    of a run, and single characters take any place left."""
    pairs = sum(1 for n in lengths if n == 2)
    room = run = 0  # line marks are never free, so a run of neighbours stays inside one line
    for pos in sorted(free):
        run = run + 1 if pos - 1 in free else 1
        room += run % 2 == 0
    return pairs <= room and len(free) - 2 * pairs >= len(lengths) - pairs


def _check_keyword_room(layout: Layout, name: str, prompt: str, acrostic: str | None, keywords: list[str],
                        rhymes_at=()) -> None:
    han = layout.han_positions
    taken = set(han[:len(prompt)]) | {layout.starts[line] for line in range(len(acrostic or ""))} | set(rhymes_at)
    free = set(han) - taken
    words = keywords_to_place(keywords, prompt, acrostic, layout)
    if not keywords_fit(free, [len(w) for w in words]):
        by = "prompt" if prompt else "acrostic" if acrostic else "form"
        raise RequestError("bad_keywords", "keywords",
                           f"the keywords do not fit: they need {sum(map(len, words))} characters "
                           f"(a 2-character keyword inside one line) and the {by} leaves {len(free)} places "
                           f"of this {name}")


def _show(value) -> str:
    """A number for an error message, kept short (str() of an int past 4300 digits even raises)."""
    if isinstance(value, int) and abs(value) >= 10**20:
        return f"a {len(format(abs(value), 'x')) * 4}-bit integer"
    return repr(value)


def _check_int(name, value, low, high):
    _check_type(name, value, int)
    if not low <= value <= high:
        raise RequestError("out_of_range", name, f"{name} must be between {low} and {high}, got {_show(value)}")


def _check_float(name, value, low, high, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError("bad_type", name, f"{name} must be a number, got {type(value).__name__}")
    try:
        number = float(value)  # an int too large for a float is out of range, not an OverflowError
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError("out_of_range", name, f"{name} must be in {interval}, got {_show(value)}")


@dataclass
class PoemResult:
    poem: str  # "line，line。line，line。"; a 词 keeps its tune's marks and has "\n" at the stanza break
    lines: list[str]
    form: str
    mode: str
    model: dict  # {"name": "lstm", "version": "…"}
    elapsed_ms: float
    notes: list[str] = field(default_factory=list)  # soft rules that were relaxed, and why
    score: float | None = None  # the poem's total log-probability under the model
    tune: str | None = None  # the 词 tune, when form is ci

    def to_dict(self) -> dict:
        # NOTE: not dataclasses.asdict: its deep copy was a tenth of the service's time per poem.
        return {"poem": self.poem, "lines": list(self.lines), "form": self.form, "mode": self.mode,
                "model": dict(self.model), "elapsed_ms": self.elapsed_ms, "notes": list(self.notes),
                "score": self.score, "tune": self.tune}

    @classmethod
    def from_dict(cls, data: dict) -> PoemResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class PoemEngine(Protocol):
    """What the bot needs from an engine: `engine.serving.local.LocalEngine` and `engine.serving.client.EngineClient`."""

    async def generate(self, request: PoemRequest) -> PoemResult: ...

    async def models(self) -> list[dict]: ...

    async def status(self) -> dict: ...

    async def reload(self) -> dict: ...
