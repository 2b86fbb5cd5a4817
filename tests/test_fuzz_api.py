"""Property-based fuzzing of the engine's JSON API through the real aiohttp app (issue 7, docs/RELIABILITY.md).

    .venv/bin/python -m pytest tests/test_fuzz_api.py -q                  # bounded (CI)
    YINSHI_SOAK=1 .venv/bin/python -m pytest tests/test_fuzz_api.py -q    # the long soak variants too

Every request — wrong types, huge numbers, NaN/Infinity literals, nested junk, invalid UTF-8, lone
surrogates, empty and 10 MB bodies, every field at and past its bounds, random routes and admin calls —
must be answered 2xx, 4xx or 503 with a JSON error naming the field; never a 500. Afterwards the engine
still writes poems, with nothing left queued or running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os

import pytest
from hypothesis import HealthCheck, event, given, settings as hsettings, strategies as st

from engine.model import versions as store
from engine.api import PoemRequest
from engine.errors import RequestError
from engine.serving.service import ENGINE, ServiceSettings, create_app
from engine_fixtures import engine_settings

SOAK = os.environ.get("YINSHI_SOAK") == "1"
TOKEN = "fuzz-admin-token-0123456789"
FUZZ = dict(deadline=None, derandomize=not SOAK, suppress_health_check=list(HealthCheck))

# What the service may answer to anything: never a 500. (A 504 only where the body set its own `timeout`.)
ALLOWED = {200, 400, 401, 403, 404, 405, 413, 503}
BODY_LEVEL_CODES = {"bad_json", "bad_encoding", "bad_request", "body_too_large"}


@pytest.fixture
def lstm_store(tmp_path, tiny_checkpoint):
    root = tmp_path / "checkpoints"
    store.publish(root, "lstm", tiny_checkpoint)
    return root


@pytest.fixture
async def client(aiohttp_client, lstm_store):
    # Small rows and queue so that a burst of valid requests also meets the 503 path.
    settings = ServiceSettings(engine=engine_settings(lstm_store, model_names=("lstm",), max_num_rows=32,
                                                      max_queue=8, threads=1), token=TOKEN)
    return await aiohttp_client(create_app(settings))


# -- strategies -------------------------------------------------------------------------------------------------

SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
ANY_CHAR = st.characters(codec=None, exclude_categories=())  # every code point, surrogates included
HAN = st.sampled_from("月山水花风云春秋天人江河日夜明清白青长空龘鬱乾後")
huge_ints = st.sampled_from([2**63, -(2**63) - 1, 10**30, 10**400, -(10**400), 10**4000])
junk = st.recursive(
    st.none() | st.booleans() | st.integers() | huge_ints | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(ANY_CHAR, max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(ANY_CHAR, max_size=6), inner, max_size=4),
    max_leaves=12)
strings = st.text(ANY_CHAR, max_size=30) | st.text(HAN, max_size=20) | st.text(SURROGATES | HAN, max_size=8)


def around(*points: float):
    """Numbers at, just inside and just past each bound, as ints and floats."""
    values = []
    for p in points:
        values += [p, p - 1, p + 1, p - 1e-9, p + 1e-9, float(p), -p]
    return st.sampled_from(values)


FIELD_VALUES = {
    "prompt": strings | st.text(HAN, min_size=13, max_size=16),
    "form": st.sampled_from(["wujue", "qijue", "wulv", "qilv", "五绝", "七言律诗", " QIJUE ", "sonnet", ""]) | strings,
    "mode": st.sampled_from(["greedy", "sample", "beam", "Beam", "fast", ""]) | strings,
    "beam_width": around(0, 1, 16, 17) | st.integers(-5, 40),
    "temperature": around(0, 2) | st.floats(allow_nan=True, allow_infinity=True),
    "top_p": around(0, 1) | st.floats(allow_nan=True, allow_infinity=True),
    "top_k": around(0, 100_000) | st.integers(-3, 200),
    "acrostic": st.none() | st.text(HAN, min_size=3, max_size=9) | strings,
    "rhyme": st.booleans() | st.sampled_from([0, 1, "true", None]),
    "tone": st.booleans() | st.sampled_from([0, 1, "false", None]),
    "model": st.none() | st.sampled_from(["lstm", "gru", "transformer", "LSTM", ""]) | strings,
    "seed": st.none() | around(0, 2**63 - 1) | st.integers(),
    "timeout": st.none() | around(0, 3600) | st.floats(min_value=5, max_value=3600),
    "keywords": st.lists(st.text(HAN, max_size=3) | strings, max_size=5),
}


@st.composite
def poem_bodies(draw):
    """A JSON object: some contract fields with edge or junk values, sometimes an unknown key."""
    names = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), unique=True, max_size=6))
    body = {}
    for name in names:
        body[name] = draw(FIELD_VALUES[name] | junk) if draw(st.integers(0, 5)) == 0 else draw(FIELD_VALUES[name])
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(ANY_CHAR, min_size=1, max_size=8))] = draw(junk)
    # Keep the valid ones cheap: the tiny model writes a wujue in milliseconds, a 16-wide qilv beam in many.
    if isinstance(body.get("beam_width"), int) and not isinstance(body.get("beam_width"), bool):
        body.setdefault("form", "wujue")
    return body


def encode(body) -> bytes:
    # ensure_ascii: lone surrogates go out as \ud800 escapes, exactly what a hostile client can send.
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


def field_alone_is_bad(name: str, value) -> bool:
    """Would this one field, alone, be refused by validation? (the oracle for the properties)"""
    if name not in FIELD_VALUES:
        return True
    try:
        PoemRequest.from_dict({name: value})
    except RequestError:
        return True
    return False


async def check_answer(resp, sent: bytes | None = None) -> dict | None:
    """The common contract: an allowed status; every error is JSON with a code and a message."""
    text = await resp.text()
    assert resp.status in ALLOWED, (resp.status, text[:500], (sent or b"")[:300])
    if resp.status == 200:
        return None
    assert resp.content_type == "application/json", text[:200]
    error = json.loads(text)["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if resp.status == 503:
        assert int(resp.headers["Retry-After"]) >= 1
    return error


async def assert_healthy(client) -> None:
    """Liveness, readiness, a real poem, and nothing left in the queue or running."""
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    resp = await client.post("/v1/poems", json={"prompt": "月", "form": "wujue", "mode": "greedy"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["poem"].startswith("月")
    status = await (await client.get("/v1/status")).json()
    assert status["queue_depth"] == 0 and status["running_rows"] == 0 and status["ready"]
    assert not client.app[ENGINE]._futures  # no request left waiting for an answer


# -- properties -------------------------------------------------------------------------------------------------

async def _poem_body_property(client, body):
    raw = encode(body)
    body = json.loads(raw)  # what the server sees: an escaped surrogate pair decodes to one character
    resp = await client.post("/v1/poems", data=raw, headers={"Content-Type": "application/json"})
    if resp.status == 504:  # the request's own `timeout` (valid down to 1e-9 s) passed first: the contract's 504
        assert isinstance(body.get("timeout"), (int, float)) and (await resp.json())["error"]["code"] == "timeout"
        event("HTTP 504 timeout")
        return
    error = await check_answer(resp, raw)
    event(f"HTTP {resp.status}" + (f" {error['code']}" if error else ""))
    bad_alone = [name for name, value in body.items() if field_alone_is_bad(name, value)]
    if error is None:
        assert not bad_alone, f"accepted although {bad_alone} are invalid: {body!r}"
        poem = await resp.json()
        assert poem["poem"] and poem["lines"]
        return
    if resp.status == 400:
        assert error["code"] not in BODY_LEVEL_CODES, error
        assert error["field"] in body, f"the error names {error['field']!r}, not a field that was sent: {body!r}"
    elif resp.status == 503:
        assert error["code"] in ("queue_full", "unavailable")


@hsettings(max_examples=500, **FUZZ)
@given(body=poem_bodies())
async def test_any_json_object_is_answered_with_a_poem_or_an_error_naming_the_field(client, body):
    await _poem_body_property(client, body)


@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="soak run: set YINSHI_SOAK=1")
@hsettings(max_examples=4000, **FUZZ)
@given(body=poem_bodies())
async def test_soak_any_json_object(client, body):
    await _poem_body_property(client, body)


INVALID_UTF8 = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe6\x9c", b"\xf8\x88\x80\x80\x80", b"\x80"]


@st.composite
def raw_bodies(draw):
    """Bytes: junk, broken UTF-8 inside valid JSON, JS number literals, deep nesting, huge numbers."""
    kind = draw(st.integers(0, 7))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        bad = draw(st.sampled_from(INVALID_UTF8))
        field = draw(st.sampled_from(sorted(FIELD_VALUES)))
        return b'{"' + field.encode() + b'": "' + bad + b'"}'
    if kind == 2:
        literal = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1" * 5000,
                                        b"-" + b"9" * 4400, b"0" * 300 + b"1", b"1e-400", b"true", b"null"]))
        field = draw(st.sampled_from(sorted(FIELD_VALUES)))
        return b'{"' + field.encode() + b'": ' + literal + b"}"
    if kind == 3:
        depth = draw(st.integers(1, 8000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        return opener * depth + b"1" + closer * depth
    if kind == 4:
        return draw(st.sampled_from([b"", b" ", b"\n\t ", b"{}", b"[]", b"null", b"0", b'""', b"{", b"}", b"\x00",
                                     b"\xef\xbb\xbf{}", b'{"prompt": "\\ud800"}', b'{"\\udfff": 1}',
                                     b'{"prompt": "\\ud800\\udc00"}', b'{"prompt": "\\u0000"}',
                                     b'{"prompt": "\xe6\x9c\x88", "prompt": 5}']))
    if kind == 5:
        return encode(draw(junk))
    if kind == 6:  # a valid body cut short
        whole = encode(draw(poem_bodies()))
        return whole[: draw(st.integers(0, len(whole)))]
    return json.dumps(draw(poem_bodies()), ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


async def _raw_body_property(client, raw, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    resp = await client.post("/v1/poems", data=raw, headers=headers)
    if resp.status == 504:
        assert b'"timeout"' in raw and (await resp.json())["error"]["code"] == "timeout"
        return
    error = await check_answer(resp, raw)
    event(f"HTTP {resp.status}" + (f" {error['code']}" if error else ""))
    if error is not None and resp.status == 400 and error["code"] in BODY_LEVEL_CODES:
        assert error["field"] is None


@hsettings(max_examples=400, **FUZZ)
@given(raw=raw_bodies(), content_type=st.sampled_from(["application/json", "text/plain", None,
                                                       "application/json; charset=latin-1"]))
async def test_any_bytes_are_answered_without_a_500(client, raw, content_type):
    await _raw_body_property(client, raw, content_type)


@pytest.mark.soak
@pytest.mark.skipif(not SOAK, reason="soak run: set YINSHI_SOAK=1")
@hsettings(max_examples=3000, **FUZZ)
@given(raw=raw_bodies(), content_type=st.sampled_from(["application/json", "text/plain", None]))
async def test_soak_any_bytes(client, raw, content_type):
    await _raw_body_property(client, raw, content_type)


# Every field at and just past each bound, exhaustively (not sampled): (field, value, accepted?).
BOUNDS = [
    ("prompt", "", True), ("prompt", "月" * 5, True), ("prompt", "月山水花风云春秋天人江河日夜", True),
    ("prompt", "月" * 15, False), ("prompt", "\ud800", False), ("prompt", "月\udfff", False),
    ("prompt", "\U0001F319", False), ("prompt", "\x00", False),
    ("beam_width", 0, False), ("beam_width", 1, True), ("beam_width", 16, True), ("beam_width", 17, False),
    ("beam_width", -1, False), ("beam_width", 1.0, False), ("beam_width", 2**63, False), ("beam_width", 10**4000, False),
    ("temperature", 0, False), ("temperature", 1e-300, True), ("temperature", 2.2250738585e-313, True),
    ("temperature", 5e-324, True), ("temperature", 1e-40, True), ("temperature", 2, True), ("temperature", 2.0000001, False),
    ("temperature", -0.0, False), ("temperature", 10**400, False), ("temperature", -(10**400), False),
    ("top_p", 0, False), ("top_p", 5e-324, True), ("top_p", 1, True), ("top_p", 1.0000001, False),
    ("top_p", 10**400, False),
    ("top_k", -1, False), ("top_k", 0, True), ("top_k", 100_000, True), ("top_k", 100_001, False),
    ("top_k", 10**4000, False),
    ("seed", -1, False), ("seed", 0, True), ("seed", 2**63 - 1, True), ("seed", 2**63, False),
    ("seed", 10**4000, False), ("seed", None, True),
    ("timeout", 0, False), ("timeout", 3600, True), ("timeout", 3600.5, False), ("timeout", 10**400, False),
    ("acrostic", "春秋山", False), ("acrostic", "春秋山水", True), ("acrostic", "春秋山水花", False),
    ("acrostic", "春夏秋冬", False),  # 夏 and 冬 are not in the tiny model's vocabulary
    ("acrostic", "春夏秋冬山水花风", False),  # 8 heads need a lushi; the default form is a jueju
    ("acrostic", "春夏\ud800冬", False), ("acrostic", "", False),
    ("form", "qilv", True), ("form", "七律", True), ("form", "qilu", False), ("form", "\ud800", False),
    ("mode", "beam", True), ("mode", "BEAM", False), ("mode", "\udc00", False),
    ("model", "lstm", True), ("model", "gru", False), ("model", "\ud800", False), ("model", "", False),
    ("rhyme", False, True), ("rhyme", 0, False), ("tone", None, True), ("tone", "no", False),
]


@pytest.mark.parametrize("name, value, accepted", BOUNDS,
                         ids=[f"{n}={ascii(v)[:24]}" for n, v, _ in BOUNDS])
async def test_every_field_at_and_past_its_bounds(client, name, value, accepted):
    body = {name: value, "form": "wujue", "mode": "greedy"} if name not in ("form", "mode") else {name: value}
    if name == "beam_width":
        body["mode"] = "beam"
    if name in ("temperature", "top_p", "top_k"):
        body["mode"] = "sample"
    raw = encode(body)
    resp = await client.post("/v1/poems", data=raw, headers={"Content-Type": "application/json"})
    error = await check_answer(resp, raw)
    if accepted:
        assert resp.status == 200, error
    else:
        assert resp.status == 400 and error["field"] == name, error


async def test_a_subnormal_temperature_samples_a_poem_and_fails_no_one_else_in_the_batch(client):
    """Found by the soak fuzz: 2.2e-313 became 0 in float32, the draw took <pad>, and the step failed every
    request in the batch with a 503."""
    bodies = [{"prompt": "月", "form": "wujue", "mode": "sample", "temperature": t, "seed": k}
              for k, t in enumerate([0.8, 2.2250738585e-313, 0.8, 5e-324, 1e-40, 0.8])]
    answers = await asyncio.gather(*(client.post("/v1/poems", json=b) for b in bodies))
    for resp in answers:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["poem"].startswith("月")
    assert client.app[ENGINE].counts["failed"] == 0


@pytest.mark.parametrize("field", ["prompt", "acrostic", "form", "mode", "model"])
async def test_a_lone_surrogate_is_a_400_naming_the_field_even_inside_a_valid_string(client, field):
    resp = await client.post("/v1/poems", data=b'{"%s": "\\u6708\\ud800"}' % field.encode(),
                             headers={"Content-Type": "application/json"})
    error = await check_answer(resp)
    assert resp.status == 400 and error["field"] == field


async def test_an_unknown_key_holding_a_lone_surrogate_is_named_in_a_readable_error(client):
    resp = await client.post("/v1/poems", data=b'{"\\ud800x": 1}', headers={"Content-Type": "application/json"})
    error = await check_answer(resp)
    assert resp.status == 400 and error["code"] == "unknown_field" and error["field"] == "\ud800x"


@pytest.mark.parametrize("digits", [4301, 5000, 15000])
async def test_an_integer_too_long_to_parse_is_a_400(client, digits):
    resp = await client.post("/v1/poems", data=b'{"seed": ' + b"7" * digits + b"}",
                             headers={"Content-Type": "application/json"})
    error = await check_answer(resp)
    assert resp.status in (400, 413), error
    assert error["code"] in ("bad_json", "body_too_large", "out_of_range")


@pytest.mark.parametrize("size", [16 * 1024 + 1, 1 << 20, 10 << 20])
async def test_a_body_of_megabytes_is_a_413_and_the_engine_stays_healthy(client, size):
    payload = b'{"prompt": "' + b"a" * (size - 14) + b'"}'
    resp = await client.post("/v1/poems", data=payload, headers={"Content-Type": "application/json"})
    error = await check_answer(resp)
    assert resp.status == 413 and error["code"] == "body_too_large"
    await assert_healthy(client)


async def test_an_empty_body_is_a_poem_with_every_default(client):
    resp = await client.post("/v1/poems", data=b"")
    assert resp.status == 200 and (await resp.json())["form"] == "qijue"


METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
PATHS = ["/v1/poems", "/v1/models", "/v1/status", "/healthz", "/readyz", "/metrics", "/v1/admin/reload", "/",
         "/v1", "/v1/poems/", "/v1/admin", "/../etc/passwd", "/v1/%00", "/v1/poems?x=1", "/%E6%9C%88", "/%ff%fe"]


async def _route_property(client, method, path, auth, raw):
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    resp = await client.request(method, path, data=raw if method not in ("GET", "HEAD") else None, headers=headers)
    if method == "HEAD":
        assert resp.status in ALLOWED
        return
    await check_answer(resp, raw)


@hsettings(max_examples=200, **FUZZ)
@given(method=st.sampled_from(METHODS), path=st.sampled_from(PATHS) | st.text("/abcv1?=%&.", max_size=20).map(lambda s: "/" + s.lstrip("/")),
       auth=st.none() | st.sampled_from([f"Bearer {TOKEN}", "Bearer", "Bearer wrong", f"Basic {TOKEN}",
                                         f"bearer  {TOKEN} ", "Bearer \u6708"]),
       raw=st.sampled_from([b"", b"{}", b'{"model": "lstm"}', b'{"model": 5}', b'{"name": 1}', b"[", b"\xff"]))
async def test_any_route_method_and_admin_call_gets_a_json_answer_never_a_500(client, method, path, auth, raw):
    await _route_property(client, method, path, auth, raw)


async def test_after_the_fuzzing_the_engine_still_writes_poems_and_logged_no_internal_error(client, caplog):
    with caplog.at_level(logging.ERROR, logger="engine.serving.service"):
        for body in [b'{"temperature": 1e999}', b'{"\\ud800": 1}', b'{"seed": ' + b"9" * 5000 + b"}",
                     b'{"beam_width": 100000000000000000000000000000000000000000}', b"[" * 9000]:
            await check_answer(await client.post("/v1/poems", data=body))
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    await assert_healthy(client)


def test_the_oracle_itself_can_tell_good_from_bad():
    """The properties above lean on field_alone_is_bad; make sure it is not vacuous."""
    assert field_alone_is_bad("beam_width", 17) and not field_alone_is_bad("beam_width", 16)
    assert field_alone_is_bad("temperature", math.nan) and field_alone_is_bad("nonsense", 1)
