"""Access and secrets (issue 7, docs/RELIABILITY.md): who may do what, the engine's token and bind address,
checkpoints that are never unpickled nor read from outside the store, no secret in any log line or
reply, and the per-user rate limit.

    .venv/bin/python -m pytest tests/test_access.py -q
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from aiohttp import web

from bot.commands import ADMINS_ONLY, CHAT_ADMINS_ONLY, Commands, Who
from bot.db import Store
from bot.telegram_app import configure_logging
from bot_fixtures import ScriptedEngine, fake_api, make_settings, running_bot, store  # noqa: F401 (fixtures)
from engine.model import versions as ckpt_store
from engine.model.checkpoint import CheckpointError, load_checkpoint
from engine.serving.client import EngineClient
from engine.serving.local import LocalEngine
from engine.serving.service import ServiceSettings, create_app
from engine_fixtures import engine_settings
from fake_bot_api import TOKEN

ROOT = Path(__file__).resolve().parent.parent
ENGINE_TOKEN = "engine-admin-token-7f3a9c1e5b2d4c6e8a0b"  # ≥ 32 characters, as the service requires
WEBHOOK_SECRET = "webhook_secret_d41d8cd98f00b204e9800998"
ADMIN, USER, GROUP, OTHER_GROUP, CHANNEL = 999, 42, -1002000, -1002001, -1003000


@pytest.fixture
def lstm_store(tmp_path, tiny_checkpoint):
    root = tmp_path / "checkpoints"
    ckpt_store.publish(root, "lstm", tiny_checkpoint)
    return root


# -- admin commands and chat administrators ----------------------------------------------------------------------

def who(kind: str) -> Who:
    async def yes():
        return True

    async def no():
        return False

    return {
        "user": Who(USER, USER),
        "admin": Who(ADMIN, ADMIN),
        "admin-in-group": Who(GROUP, ADMIN, "supergroup", is_chat_admin=no),
        "group-admin": Who(GROUP, USER, "supergroup", is_chat_admin=yes),
        "group-member": Who(GROUP, USER, "supergroup", is_chat_admin=no),
        "channel": Who(CHANNEL, None, "channel"),
    }[kind]


@pytest.mark.parametrize("kind", ["user", "group-admin", "group-member", "channel"])
@pytest.mark.parametrize("text", ["/status", "/reload", "/retrain", "/STATUS@yinshi_test_bot", "/reload now"])
async def test_admin_commands_are_refused_to_everyone_outside_admin_ids(tmp_path, store, kind, text):
    engine, calls = ScriptedEngine(), []
    commands = Commands(engine, store, make_settings(tmp_path), retrain=lambda: calls.append(1))
    reply = await commands.handle(who(kind), text)
    assert reply.text == ADMINS_ONLY and engine.reloads == 0 and calls == []


@pytest.mark.parametrize("kind", ["admin", "admin-in-group"])
async def test_admin_ids_may_use_admin_commands_anywhere(tmp_path, store, kind):
    engine = ScriptedEngine()
    commands = Commands(engine, store, make_settings(tmp_path))
    assert (await commands.handle(who(kind), "/reload")).text != ADMINS_ONLY and engine.reloads == 1


@pytest.mark.parametrize("text", ["/form 五绝", "/greedy", "/sample 1", "/beam 3", "/model gru", "/daily 08:00",
                                  "/daily off"])
async def test_a_group_member_and_even_a_bot_admin_who_is_no_chat_admin_cannot_manage_the_group(tmp_path, store, text):
    commands = Commands(ScriptedEngine(), store, make_settings(tmp_path))
    store.subscribe(GROUP, "09:00", None)
    before = (store.chat_settings(GROUP), store.subscription(GROUP))
    for kind in ("group-member", "admin-in-group"):
        assert (await commands.handle(who(kind), text)).text == CHAT_ADMINS_ONLY
    assert (store.chat_settings(GROUP), store.subscription(GROUP)) == before
    assert (await commands.handle(who("group-admin"), text)).text != CHAT_ADMINS_ONLY


async def test_an_admin_of_another_group_cannot_subscribe_this_one(tmp_path, fake_api, store):
    settings = make_settings(tmp_path, telegram_base_url=fake_api.base_url)
    fake_api.set_member(OTHER_GROUP, 8, "administrator")
    fake_api.set_member(GROUP, 9, "creator")
    async with running_bot(settings, ScriptedEngine(), store):
        fake_api.message(GROUP, "/daily 08:00", user_id=8, chat_type="supergroup")
        [refused] = await fake_api.wait_for_sent(1)
        fake_api.message(GROUP, "/daily 07:30", sender_chat={"id": GROUP, "type": "supergroup", "title": "g"},
                         user_id=1087968824, chat_type="supergroup")  # an anonymous admin posts as the group
        await fake_api.wait_for_sent(2)
        fake_api.message(GROUP, "/daily 08:00", sender_chat={"id": OTHER_GROUP, "type": "supergroup", "title": "o"},
                         user_id=1087968824, chat_type="supergroup")  # posting as another chat is not admin here
        third = (await fake_api.wait_for_sent(3))[2]
    assert "administrators" in refused["text"] and "administrators" in third["text"]
    assert store.subscription(GROUP).time == "07:30"
    assert [(c["chat_id"], c["user_id"]) for c in fake_api.calls_of("getChatMember")][0] == (GROUP, 8)


# -- the engine's admin token and bind address ------------------------------------------------------------------

@pytest.mark.parametrize("auth, status", [
    (None, 401), ("", 401), ("Bearer", 401), ("Bearer ", 401), (f"Basic {ENGINE_TOKEN}", 401),
    (f"Bearer {ENGINE_TOKEN[:-1]}", 403), (f"Bearer {ENGINE_TOKEN}x", 403), (f"Bearer {ENGINE_TOKEN.upper()}", 403),
    (f"Token {ENGINE_TOKEN}", 401), (f"Bearer {ENGINE_TOKEN}", 200), (f"bearer {ENGINE_TOKEN}", 200),
])
async def test_engine_admin_reload_needs_exactly_the_token(aiohttp_client, lstm_store, auth, status):
    settings = ServiceSettings(engine=engine_settings(lstm_store, model_names=("lstm",)), token=ENGINE_TOKEN)
    client = await aiohttp_client(create_app(settings))
    headers = {} if auth is None else {"Authorization": auth}
    resp = await client.post(f"/v1/admin/reload?token={ENGINE_TOKEN}", headers=headers)  # a query token counts for nothing
    assert resp.status == status
    text = await resp.text()
    if status != 200:
        assert ENGINE_TOKEN not in text and "error" in text


@pytest.mark.parametrize("auth", [None, "Bearer ", "Bearer anything", f"Bearer {ENGINE_TOKEN}"])
async def test_without_engine_token_the_admin_routes_are_off_for_everyone(aiohttp_client, lstm_store, auth):
    client = await aiohttp_client(create_app(ServiceSettings(engine=engine_settings(lstm_store, model_names=("lstm",)))))
    resp = await client.post("/v1/admin/reload", headers={"Authorization": auth} if auth else {})
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "admin_disabled"


@pytest.mark.parametrize("raw", [b"Bearer \xff\xfe", b"Bearer \xc0\xaf" + ENGINE_TOKEN.encode(), b"\xff " + b"x" * 40,
                                 "Bearer 月".encode()])
async def test_a_non_utf8_or_non_ascii_authorization_header_is_refused_not_a_500(aiohttp_server, lstm_store, raw):
    settings = ServiceSettings(engine=engine_settings(lstm_store, model_names=("lstm",)), token=ENGINE_TOKEN)
    server = await aiohttp_server(create_app(settings))
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"POST /v1/admin/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n"
                 b"Authorization: " + raw + b"\r\n\r\n")
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    status = int(status_line.split()[1])
    assert status in (400, 401, 403), status_line


def test_engine_token_is_stripped_and_must_have_32_characters():
    assert ServiceSettings.from_env({"ENGINE_TOKEN": f"  {ENGINE_TOKEN}\n"}).token == ENGINE_TOKEN
    assert ServiceSettings.from_env({}).token is None and ServiceSettings.from_env({"ENGINE_TOKEN": " "}).token is None
    with pytest.raises(ValueError, match="ENGINE_TOKEN") as info:
        ServiceSettings.from_env({"ENGINE_TOKEN": "s3cret-but-short"})
    assert "s3cret-but-short" not in str(info.value)
    assert ENGINE_TOKEN not in repr(ServiceSettings(token=ENGINE_TOKEN))


def test_python_m_engine_serve_with_a_short_engine_token_refuses_to_start(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ENGINE_TOKEN": "short-token", "DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "engine", "serve", "--port", "1", "--checkpoints", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ENGINE_TOKEN" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "short-token" not in proc.stderr + proc.stdout


async def test_a_client_without_the_token_never_sends_an_admin_call():
    client = EngineClient("http://127.0.0.1:9", retries=0)
    with pytest.raises(PermissionError):
        await client.reload()
    await client.close()


def _listening(port: int) -> list[str]:
    """Local addresses listening on `port`, from /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def test_python_m_engine_serve_listens_on_loopback_only(lstm_store, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ENGINE_MODELS": "lstm", "ENGINE_WATCH_INTERVAL": "0",
           "ENGINE_TOKEN": ENGINE_TOKEN, "DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(port), "--checkpoints",
                             str(lstm_store)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        addresses = []
        for _ in range(600):
            addresses = _listening(port)
            if addresses or proc.poll() is not None:
                break
            import time

            time.sleep(0.1)
        assert addresses, proc.stdout.read().decode() if proc.poll() is not None else "never listened"
        assert set(addresses) == {"0100007F"}, addresses  # 127.0.0.1 only, not 0.0.0.0 nor ::
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert ENGINE_TOKEN not in out.decode()


# -- checkpoints: never unpickled, never from outside the store -------------------------------------------------

class Boom:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickles(tmp_path: Path) -> dict[str, Path]:
    marker = tmp_path / "UNPICKLED"
    files = {}
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"model": Boom(str(marker))}))
    files["pickle"] = raw
    zipped = tmp_path / "torch.safetensors"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "boom": Boom(str(marker))}, zipped)
    files["torch.save"] = zipped
    return files


def test_a_pickle_renamed_safetensors_is_refused_without_being_unpickled(tmp_path):
    for kind, path in _pickles(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value), kind
        with pytest.raises(ckpt_store.StoreError):
            ckpt_store.publish(tmp_path / "store", "lstm", path)
    assert not (tmp_path / "UNPICKLED").exists()
    # The marker really would appear if something unpickled it (the test can fail):
    pickle.loads((tmp_path / "raw.safetensors").read_bytes())
    assert (tmp_path / "UNPICKLED").exists()


async def test_a_pickle_slipped_into_the_store_is_refused_by_the_engine(lstm_store, tmp_path):
    path = _pickles(tmp_path)["torch.save"]
    version = "29990101T000000000Z"
    os.replace(path, ckpt_store.version_path(lstm_store, "lstm", version))
    (lstm_store / "lstm" / "CURRENT").write_text(version + "\n")
    async with LocalEngine(engine_settings(lstm_store, model_names=("lstm",))) as engine:
        report = await engine.reload("lstm")
    assert report["lstm"]["status"] == "refused" and not (tmp_path / "UNPICKLED").exists()


def test_no_engine_or_bot_code_can_unpickle():
    sources = [p for d in ("engine", "bot") for p in (ROOT / d).rglob("*.py")]
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in sources
                 for m in re.finditer(r"torch\.load\(|pickle\.loads?\(|import pickle|weights_only\s*=\s*False",
                                      p.read_text(encoding="utf-8"))]
    assert not offenders


async def test_a_model_directory_linked_to_outside_the_store_is_refused(lstm_store, tmp_path, tiny_checkpoint):
    outside = tmp_path / "outside"
    ckpt_store.publish(outside, "gru", tiny_checkpoint)
    (lstm_store / "gru").symlink_to(outside / "gru", target_is_directory=True)
    engine = LocalEngine(engine_settings(lstm_store, model_names=("lstm", "gru")))
    empty = tmp_path / "package"
    empty.mkdir()
    engine.registry.package_dir = empty  # no shipped gru to fall back on: the refused one must stay out
    async with engine:
        assert engine.loaded_names() == ["lstm"]
        report = await engine.reload("gru")
    assert report["gru"]["status"] == "refused" and "outside" in report["gru"]["reason"]


@pytest.mark.parametrize("current", ["../../../etc/passwd", "../gru/versions/x", "/abs/path", "v1/../../x"])
async def test_a_current_pointer_that_climbs_out_of_the_store_is_refused(lstm_store, current):
    (lstm_store / "lstm" / "CURRENT").write_text(current + "\n")
    async with LocalEngine(engine_settings(lstm_store, model_names=("lstm",))) as engine:
        report = await engine.reload("lstm")
    assert report["lstm"]["status"] == "refused"


async def test_a_reload_of_a_path_like_model_name_is_a_400(aiohttp_client, lstm_store):
    client = await aiohttp_client(create_app(ServiceSettings(engine=engine_settings(lstm_store, model_names=("lstm",)),
                                                             token=ENGINE_TOKEN)))
    resp = await client.post("/v1/admin/reload", json={"model": "../../etc"},
                             headers={"Authorization": f"Bearer {ENGINE_TOKEN}"})
    assert resp.status == 400 and (await resp.json())["error"]["field"] == "model"


# -- no secret in any log line or error message -------------------------------------------------------------------

class RawRecords(logging.Handler):
    """Messages as our own code writes them, before the redacting filter on the root handlers touches them:
    bot/ and engine/ must not put a secret into a message at all. (An exception's own text, e.g. a hook's,
    is outside our code; the filter redacts it — checked on caplog.)"""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


async def test_no_secret_in_any_log_line_traceback_or_reply_across_a_full_session(tmp_path, fake_api, lstm_store,
                                                                                 caplog):
    secrets = [TOKEN, ENGINE_TOKEN, WEBHOOK_SECRET]
    settings = make_settings(tmp_path, telegram_base_url=fake_api.base_url, engine_token=ENGINE_TOKEN,
                             webhook_secret=WEBHOOK_SECRET, engine_url="http://127.0.0.1:1")
    raw = RawRecords()
    for name in ("bot", "engine"):
        logging.getLogger(name).addHandler(raw)
    caplog.set_level(logging.DEBUG)
    configure_logging(settings, level=logging.DEBUG)  # production logging: httpx at WARNING, redaction on

    runner = web.AppRunner(create_app(ServiceSettings(engine=engine_settings(lstm_store, model_names=("lstm",),
                                                                             threads=1), token=ENGINE_TOKEN)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    def failing_retrain():  # a hook whose error carries the bot token, as a library's URL might
        raise RuntimeError(f"POST https://api.telegram.org/bot{TOKEN}/getMe failed; engine token {ENGINE_TOKEN}")

    client = EngineClient(url, token=ENGINE_TOKEN, retries=1, backoff=0.05)
    wrong = EngineClient(url, token=ENGINE_TOKEN + "-wrong", retries=0)
    store = Store.open(settings.database_path)
    fake_api.forbidden_chats.add(77)
    try:
        async with running_bot(settings, client, store, retrain=failing_retrain):
            for text in ("/poem 月", "/status", "/reload", "/retrain", "/beam 3", "/poem 龘", "/form 九言"):
                fake_api.message(ADMIN, text)
            await fake_api.wait_for_sent(7, timeout=60)
            fake_api.fail_next("sendMessage", 502)
            fake_api.message(USER, "/poem 山")  # a traceback through the error handler
            fake_api.message(77, "/poem 水")  # Forbidden
            await fake_api.wait_for_sent(8, timeout=30)
            with pytest.raises(PermissionError) as refused:
                await wrong.reload()
            await runner.cleanup()  # the engine goes away: connection errors in the logs
            fake_api.message(ADMIN, "/poem 花")
            fake_api.message(ADMIN, "/status")
            await fake_api.wait_for_sent(10, timeout=30)
            await asyncio.sleep(0.3)
    finally:
        await client.close()
        await wrong.close()
        store.close()
        for name in ("bot", "engine"):
            logging.getLogger(name).removeHandler(raw)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    captured = [r.getMessage() for r in caplog.records] + [caplog.text]
    replies = [m["text"] for m in fake_api.sent]
    assert any(r.exc_info or r.exc_text for r in caplog.records)  # errors with tracebacks were in the session
    assert any("retrain failed" in t for t in replies) and any("try again" in t for t in replies)
    for secret in secrets:
        for where, texts in (("log", captured), ("raw bot/engine log", raw.lines), ("reply", replies),
                             ("client error", [str(refused.value)])):
            leaks = [t for t in texts if secret in t]
            assert not leaks, f"{secret[:6]}… in a {where}: {leaks[0][:300]}"


def test_the_settings_repr_and_errors_never_show_a_secret():
    settings = make_settings(Path("/tmp"), engine_token=ENGINE_TOKEN, webhook_secret=WEBHOOK_SECRET)
    for secret in (TOKEN, ENGINE_TOKEN, WEBHOOK_SECRET):
        assert secret not in repr(settings) and secret not in str(settings)
    from bot.settings import Settings, SettingsError

    bad_token = TOKEN.replace(":", ";")
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"TELEGRAM_BOT_TOKEN": bad_token}, env_file=None)
    assert bad_token not in str(info.value) and "AAFake" not in str(info.value)


# -- the per-user rate limit --------------------------------------------------------------------------------------

async def test_the_rate_limit_is_per_user_across_chats_with_a_clear_reply(tmp_path, fake_api, store):
    settings = make_settings(tmp_path, telegram_base_url=fake_api.base_url, rate_limit_count=2,
                             rate_limit_seconds=600.0)
    async with running_bot(settings, ScriptedEngine(), store):
        fake_api.message(USER, "/poem 月")
        fake_api.message(GROUP, "/poem 山", user_id=USER, chat_type="supergroup")
        await fake_api.wait_for_sent(2)
        fake_api.message(USER, "月")  # plain text counts too
        limited = (await fake_api.wait_for_sent(3))[2]
        fake_api.message(GROUP, "/poem 水", user_id=USER + 1, chat_type="supergroup")  # someone else is not limited
        fake_api.message(USER, "/settings")  # nor are other commands
        fake_api.inline_query(USER, "月")
        sent = await fake_api.wait_for_sent(5)
        [inline] = await fake_api.wait_for_calls("answerInlineQuery")
    assert re.search(r"Too many poems — try again in \d+ s \(at most 2 per 600 s\)", limited["text"])
    assert limited["chat_id"] == USER
    assert sent[3]["text"].startswith("水") or sent[4]["text"].startswith("水")
    assert inline["results"] == []


# -- deploy files: secrets stay off command lines and out of containers that do not need them ---------------------

def _exec_reload_script() -> str:
    unit = (ROOT / "deploy" / "systemd" / "yinshi-engine.service").read_text()
    [line] = [x for x in unit.splitlines() if x.startswith("ExecReload=")]
    assert line.startswith("ExecReload=/bin/sh -c '") and line.endswith("'"), line
    assert "\\" not in line  # systemd would unescape backslashes first; keep the line free of them
    return line[len("ExecReload=/bin/sh -c '"):-1].replace("%%", "%")  # systemd's specifier escape


async def test_the_systemd_reload_sends_the_engine_token_without_putting_it_on_curls_command_line(tmp_path):
    import shutil

    real_curl = shutil.which("curl")
    if real_curl is None:
        pytest.skip("no curl here")
    seen = {}

    async def reload(request):
        seen["auth"] = request.headers.get("Authorization")
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/admin/reload", reload)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    shim = tmp_path / "bin" / "curl"  # records curl's argv (what /proc/PID/cmdline shows), then runs curl
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\nexec {real_curl} "$@"\n')
    shim.chmod(0o755)
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", _exec_reload_script(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={"PATH": f"{shim.parent}:/usr/bin:/bin", "ENGINE_TOKEN": ENGINE_TOKEN, "ENGINE_PORT": str(port)})
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await runner.cleanup()
    assert proc.returncode == 0, err.decode()
    assert seen["auth"] == f"Bearer {ENGINE_TOKEN}"  # the token did arrive …
    assert ENGINE_TOKEN not in (tmp_path / "argv").read_text()  # … but not through curl's arguments


def _compose_services() -> dict[str, str]:
    """compose.yaml's text per block: each top-level key (the x- anchors) and each service as "svc:NAME"."""
    blocks, top, name = {}, None, None
    for line in (ROOT / "deploy" / "compose.yaml").read_text().splitlines():
        if re.match(r"^[\w-]+:", line):
            top = name = line.split(":")[0]
        elif top == "services" and re.match(r"^  [\w-]+:\s*$", line):
            name = "svc:" + line.strip().rstrip(":")
        if name:
            blocks[name] = blocks.get(name, "") + line + "\n"
    return blocks


def test_compose_gives_the_bot_token_and_the_whole_env_file_to_the_bot_only():
    blocks = _compose_services()
    assert {"svc:engine", "svc:bot", "svc:trainer"} <= set(blocks), list(blocks)
    for name, text in blocks.items():
        if name != "svc:bot":
            assert "env_file" not in text and "TELEGRAM_BOT_TOKEN" not in text, name
    assert "env_file" in blocks["svc:bot"]
    assert "ENGINE_TOKEN" in blocks["svc:engine"] and "ENGINE_TOKEN" not in blocks["svc:trainer"]
