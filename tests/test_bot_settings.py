"""bot.settings, bot.console and the `python -m bot` command line; docs/BOT.md documents every command."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from bot.commands import COMMANDS, Commands
from bot.console import chat, read_lines, run_console
from bot.settings import Settings, SettingsError
from bot_fixtures import *  # noqa: F401,F403
from bot_fixtures import ScriptedEngine, make_settings
from fake_bot_api import TOKEN

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_need_nothing():
    s = Settings.from_env({}, env_file=None)
    assert s.telegram_bot_token is None and s.engine_url is None and s.timezone.key == "Asia/Shanghai"
    assert s.bot_api_url == "https://api.telegram.org/bot"


def test_every_variable_is_read():
    s = Settings.from_env({
        "TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_BASE_URL": "http://localhost:8081/", "ADMIN_IDS": "1, 2,3",
        "ENGINE_URL": "http://127.0.0.1:8080", "ENGINE_TOKEN": "s3cret", "CHECKPOINT_DIR": "ck", "DEVICE": "cpu",
        "DATABASE_PATH": "x.db", "TIMEZONE": "UTC", "WEBHOOK_URL": "https://example.org/hook", "WEBHOOK_PORT": "8443",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "RATE_LIMIT": "3/10", "DAILY_GRACE_MINUTES": "30"}, env_file=None)
    assert s.admin_ids == {1, 2, 3} and s.bot_api_url == "http://localhost:8081/bot"
    assert (s.rate_limit_count, s.rate_limit_seconds, s.daily_grace_minutes) == (3, 10.0, 30)
    assert s.timezone.key == "UTC" and str(s.checkpoint_dir) == "ck" and s.webhook_url == "https://example.org/hook"


def test_bad_values_are_all_reported_with_what_is_allowed():
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"ADMIN_IDS": "alice", "TIMEZONE": "Mars/Olympus", "RATE_LIMIT": "lots",
                           "WEBHOOK_URL": "http://insecure", "ENGINE_URL": "localhost:8080", "DEVICE": "tpu"},
                          env_file=None)
    text = str(e.value)
    for key in ("ADMIN_IDS", "TIMEZONE", "RATE_LIMIT", "WEBHOOK_URL", "ENGINE_URL", "DEVICE"):
        assert key in text


@pytest.mark.parametrize("zone", ["Asia", "America", "../etc/passwd"])
def test_a_time_zone_that_is_a_folder_is_a_settings_error(zone):
    with pytest.raises(SettingsError, match="TIMEZONE"):
        Settings.from_env({"TIMEZONE": zone}, env_file=None)


WEBHOOK_SECRET = "webhook_secret_0123456789abcdef_XYZ"  # 34 characters


@pytest.mark.parametrize("secret", [None, "x", "a" * 31, "has space" + "a" * 30])
def test_webhook_mode_without_a_secret_of_32_characters_is_refused(secret):
    env = {"WEBHOOK_URL": "https://example.org/hook"} | ({"WEBHOOK_SECRET": secret} if secret else {})
    with pytest.raises(SettingsError, match="WEBHOOK_SECRET") as e:
        Settings.from_env(env, env_file=None)
    assert secret is None or secret not in str(e.value)
    assert Settings.from_env({**env, "WEBHOOK_SECRET": "a" * 32}, env_file=None).webhook_secret == "a" * 32


def test_a_short_webhook_secret_is_refused_even_without_webhook_url():
    with pytest.raises(SettingsError, match="WEBHOOK_SECRET"):
        Settings.from_env({"WEBHOOK_SECRET": "x"}, env_file=None)


def test_the_webhook_server_listens_on_loopback_by_default():
    assert Settings().webhook_listen == "127.0.0.1"
    s = Settings.from_env({"WEBHOOK_URL": "https://example.org/hook", "WEBHOOK_SECRET": WEBHOOK_SECRET}, env_file=None)
    assert s.webhook_listen == "127.0.0.1"


def test_run_refuses_webhook_settings_built_without_a_secret(tmp_path):
    from bot.telegram_app import run

    with pytest.raises(SettingsError, match="WEBHOOK_SECRET"):
        run(Settings(telegram_bot_token=TOKEN, webhook_url="https://example.org/hook"), ScriptedEngine(), None)


def test_bot_run_in_webhook_mode_without_a_secret_exits_with_one_clear_line(tmp_path):
    env = {"PATH": "", "PYTHONPATH": str(ROOT), "TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_BASE_URL": "http://127.0.0.1:9",
           "WEBHOOK_URL": "https://example.org/hook", "DATABASE_PATH": str(tmp_path / "bot.db")}
    proc = subprocess.run([sys.executable, "-m", "bot", "--env-file", str(tmp_path / "none.env"), "run"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode != 0 and "WEBHOOK_SECRET" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr + proc.stdout


def test_a_malformed_token_is_refused_without_echoing_it():
    with pytest.raises(SettingsError) as e:
        Settings.from_env({"TELEGRAM_BOT_TOKEN": "12345:tooshortbutsecret"}, env_file=None)
    assert "TELEGRAM_BOT_TOKEN" in str(e.value) and "tooshortbutsecret" not in str(e.value)


def test_secrets_stay_out_of_repr():
    s = Settings.from_env({"TELEGRAM_BOT_TOKEN": TOKEN, "ENGINE_TOKEN": "s3cret-engine"}, env_file=None)
    assert TOKEN not in repr(s) and "s3cret-engine" not in repr(s)
    assert s.secrets() == [TOKEN, "s3cret-engine"]


def test_env_file_is_read_and_the_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(f"# comment\nexport TELEGRAM_BOT_TOKEN='{TOKEN}'\nTIMEZONE=UTC\nADMIN_IDS=5\n")
    s = Settings.from_env({"ADMIN_IDS": "6"}, env_file=env_file)
    assert s.telegram_bot_token == TOKEN and s.timezone.key == "UTC" and s.admin_ids == {6}


def test_a_comment_after_a_value_in_env_is_dropped_as_bash_drops_it(tmp_path):
    """deploy/start.sh sources .env with bash; the bot read `x.db   # the bot's db` as the file name."""
    env_file = tmp_path / ".env"
    env_file.write_text("DATABASE_PATH=var/bot.db   # the bot's database\nENGINE_TOKEN='a # b'\n")
    s = Settings.from_env({}, env_file=env_file)
    assert str(s.database_path) == "var/bot.db" and s.engine_token == "a # b"
    with pytest.raises(SettingsError, match="LOG_LEVEL"):  # `DEBUG#not…` is one word to bash too
        Settings.from_env({"LOG_LEVEL": "DEBUG#not a comment"}, env_file=None)


@pytest.mark.parametrize("key", ["TELEGRAM_BASE_URL", "ENGINE_URL"])
@pytest.mark.parametrize("url, ok", [("http://api.telegram.org", False), ("http://8.8.8.8:8080", False),
                                     ("https://api.telegram.org", True), ("http://127.0.0.1:8081", True),
                                     ("http://[::1]:8081", True), ("http://localhost:8081", True),
                                     ("http://10.0.0.5:8080", True), ("http://haproxy:8080", True),
                                     # 8.8.8.8 and 127.0.0.1 as one number, as an HTTP client reads them
                                     ("http://134744072:8081", False), ("http://0x08080808:8081", False),
                                     ("http://2130706433:8081", True)])
def test_plain_http_that_would_cross_the_internet_is_refused(key, url, ok):
    """The bot token rides in every Bot API URL and ENGINE_TOKEN in a header: never in clear over the internet."""
    if ok:
        Settings.from_env({key: url}, env_file=None)
    else:
        with pytest.raises(SettingsError, match=f"{key}: plain http"):
            Settings.from_env({key: url}, env_file=None)


@pytest.mark.parametrize("url, ok", [("https://example.org/hook", True), ("https://example.org:8443/hook", True),
                                     ("https://example.org:88/hook", True), ("https://example.org:8080/hook", False),
                                     ("https://example.org:65536/hook", False), ("https://example.org:0/hook", False)])
def test_a_webhook_url_on_a_port_telegram_does_not_deliver_to_is_refused(url, ok):
    """Accepted, setWebhook was refused at start and the bot retried it for ever without a word."""
    env = {"WEBHOOK_URL": url, "WEBHOOK_SECRET": WEBHOOK_SECRET}
    if ok:
        assert Settings.from_env(env, env_file=None).webhook_url == url
    else:
        with pytest.raises(SettingsError, match="WEBHOOK_URL"):
            Settings.from_env(env, env_file=None)


@pytest.mark.parametrize("value", ["not an address", "127.0.0.1 # loopback", "localhost"])
def test_a_webhook_listen_value_that_is_not_an_ip_address_is_refused(value):
    """Accepted, it failed only after setWebhook had registered the webhook, naming no variable."""
    with pytest.raises(SettingsError, match="WEBHOOK_LISTEN"):
        Settings.from_env({"WEBHOOK_LISTEN": value}, env_file=None)
    assert Settings.from_env({"WEBHOOK_LISTEN": "::1"}, env_file=None).webhook_listen == "::1"


def test_retrain_hook_is_loaded_from_module_colon_function():
    s = Settings.from_env({"RETRAIN_HOOK": "bot.commands:help_text"}, env_file=None)
    assert s.load_retrain_hook()().startswith("吟诗")
    assert Settings().load_retrain_hook() is None
    with pytest.raises(SettingsError, match="RETRAIN_HOOK"):
        Settings.from_env({"RETRAIN_HOOK": "not a hook"}, env_file=None)
    with pytest.raises(SettingsError, match="cannot load"):
        Settings(retrain_hook="bot.nowhere:retrain").load_retrain_hook()


def test_require_token_explains_where_to_get_one():
    with pytest.raises(SettingsError, match="BotFather"):
        Settings().require_token()


async def test_console_answers_each_line_through_the_same_commands(tmp_path, store):
    engine = ScriptedEngine()
    commands = Commands(engine, store, make_settings(tmp_path))
    out = io.StringIO()
    handled = await chat(commands, read_lines(io.StringIO("/poem 月\n\n/beam 3\n山\n/quit\n/poem 春\n")), out)
    assert handled == 3
    assert out.getvalue().startswith("月") and "width 3" in out.getvalue()
    assert [r.prompt for r in engine.requests] == ["月", "山"] and engine.requests[1].mode == "beam"


async def test_run_console_is_an_admin_session_and_closes_the_store(tmp_path):
    out = io.StringIO()
    settings = make_settings(tmp_path, admin_ids=frozenset())
    await run_console(settings, engine=ScriptedEngine(), stdin=io.StringIO("/status\n"), out=out)
    assert "queue_depth" in out.getvalue()


def test_bot_run_without_a_token_exits_with_a_clear_message(tmp_path):
    env = {"PATH": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bot", "--env-file", str(tmp_path / "none.env"), "run"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "TELEGRAM_BOT_TOKEN" in proc.stderr and "Traceback" not in proc.stderr


def test_docs_describe_every_command():
    doc = (ROOT / "docs" / "BOT.md").read_text(encoding="utf-8")
    for name in COMMANDS:
        assert f"`/{name}" in doc, f"/{name} is not in docs/BOT.md"


def test_log_level_is_read_checked_and_applied(tmp_path):
    import logging

    from bot.telegram_app import configure_logging

    assert Settings().log_level == "INFO"
    assert Settings.from_env({"LOG_LEVEL": "warning"}, env_file=None).log_level == "WARNING"
    with pytest.raises(SettingsError, match="LOG_LEVEL"):
        Settings.from_env({"LOG_LEVEL": "loud"}, env_file=None)
    root = logging.getLogger()
    before = root.level
    try:
        configure_logging(make_settings(tmp_path, log_level="ERROR"))
        assert root.level == logging.ERROR
        configure_logging(make_settings(tmp_path, log_level="DEBUG"))
        assert root.level == logging.DEBUG and logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
    finally:
        root.setLevel(before)
