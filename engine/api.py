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
from engine.poem.forms import DEFAULT_FORM, FORMS, LINE_BREAKS, parse_form
from engine.poem.vocab import is_han

MODES = ("greedy", "sample", "beam")
MAX_BEAM_WIDTH = 16
MAX_PROMPT = 14


@dataclass
class PoemRequest:
    prompt: str = ""  # the poem's opening characters, 0–14 Han characters (traditional is converted)
    form: str = DEFAULT_FORM  # wujue | qijue | wulv | qilv (aliases such as 七绝 accepted)
    mode: str = "sample"  # greedy | sample | beam
    beam_width: int = 5  # 1–16, beam mode only
    temperature: float = 0.8  # (0, 2], sample mode
    top_p: float = 0.9  # (0, 1], sample mode
    top_k: int = 0  # 0 = off, sample mode
    acrostic: str | None = None  # one character per line (4 or 8), excludes prompt
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
        req = cls(**{k: v for k, v in data.items() if v is not None or k in ("acrostic", "model", "seed", "timeout")})
        req.validate()
        return req

    def validate(self) -> PoemRequest:
        """Check every field and normalise `form`, `prompt` and `acrostic`; raises RequestError. The one
        validation of a request: the bot, the HTTP service and the engine all rely on it. What only a
        model can tell (whether it knows a character) is checked when the plan is made."""
        _check_text("prompt", self.prompt)
        # Line marks in a prompt are implied by the form ("床前明月光，疑是" is the prompt 床前明月光疑是).
        self.prompt = _han_text("prompt", self.prompt, drop=LINE_BREAKS)
        if len(self.prompt) > MAX_PROMPT:
            raise RequestError("prompt_too_long", "prompt", f"prompt has {len(self.prompt)} characters; at most {MAX_PROMPT}")
        _check_text("form", self.form)
        try:
            self.form = parse_form(self.form).name
        except ValueError as e:
            raise RequestError("bad_form", "form", str(e)) from None
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
            n = FORMS[self.form].num_lines
            if len(self.acrostic) not in (4, 8):
                raise RequestError("bad_acrostic", "acrostic", f"acrostic needs 4 or 8 characters (one per line), got {len(self.acrostic)}")
            if len(self.acrostic) != n:
                raise RequestError("bad_acrostic", "acrostic",
                                   f"acrostic has {len(self.acrostic)} characters but {self.form} has {n} lines")
            if self.prompt:
                raise RequestError("bad_acrostic", "acrostic", "give either prompt or acrostic, not both")
        _check_type("rhyme", self.rhyme, bool)
        _check_type("tone", self.tone, bool)
        if self.model is not None:
            _check_text("model", self.model)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.timeout is not None:
            _check_float("timeout", self.timeout, 0.0, 3600.0, low_open=True)
        form = FORMS[self.form]
        if len(self.prompt) > form.num_chars:
            raise RequestError("prompt_too_long", "prompt", f"prompt has {len(self.prompt)} characters; a {self.form} holds {form.num_chars}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


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
    poem: str  # "line，line。line，line。"
    lines: list[str]
    form: str
    mode: str
    model: dict  # {"name": "lstm", "version": "…"}
    elapsed_ms: float
    notes: list[str] = field(default_factory=list)  # soft rules that were relaxed, and why
    score: float | None = None  # the poem's total log-probability under the model

    def to_dict(self) -> dict:
        return asdict(self)

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
