"""The bot's settings: one dataclass read from the environment and an optional `.env` file.

    settings = Settings.from_env()          # os.environ over ./.env; raises SettingsError listing every problem
    settings.timezone                       # a ZoneInfo
    print(settings)                         # the token and ENGINE_TOKEN show as '***'

Variables (all optional except TELEGRAM_BOT_TOKEN for `python -m bot run`):
    TELEGRAM_BOT_TOKEN   from @BotFather
    TELEGRAM_BASE_URL    a local Bot API server, e.g. http://localhost:8081 (default Telegram's)
    ADMIN_IDS            comma-separated Telegram user ids allowed /status /reload /retrain
    ENGINE_URL           the engine service, e.g. http://127.0.0.1:8080; unset = in-process engine
    ENGINE_TOKEN         bearer token for the engine's admin routes (/reload)
    CHECKPOINT_DIR       checkpoint store for the in-process engine
    DEVICE               auto | cpu | cuda, for the in-process engine
    DATABASE_PATH        SQLite file (default var/bot.db)
    TIMEZONE             IANA name for daily posts (default Asia/Shanghai)
    WEBHOOK_URL          public https URL; set = webhook mode, unset = polling
    WEBHOOK_SECRET       required with WEBHOOK_URL: 32–256 of A-Z a-z 0-9 _ -; Telegram sends it with each update
    WEBHOOK_LISTEN, WEBHOOK_PORT   where the webhook server listens (default 127.0.0.1:8443, behind a proxy)
    RATE_LIMIT           poem requests per user, "N/SECONDS" (default 6/60)
    DAILY_GRACE_MINUTES  a daily post missed (bot down, engine busy) is still sent this long after its time; 1–1440
    RETRAIN_HOOK         "module:function" that /retrain calls (sync or async, no arguments); unset = not configured
    LOG_LEVEL            DEBUG | INFO | WARNING | ERROR | CRITICAL (default INFO)
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_BASE_URL = "https://api.telegram.org"
TOKEN_RE = re.compile(r"^\d{3,15}:[A-Za-z0-9_-]{20,}$")  # BotFather's shape: <bot id>:<35 url-safe chars>


MIN_SECRET_LEN = 32
WEBHOOK_SECRET_REQUIRED = (f"WEBHOOK_SECRET: required with WEBHOOK_URL, at least {MIN_SECRET_LEN} characters of "
                           "A-Z a-z 0-9 _ - (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")


class SettingsError(ValueError):
    """One or more settings are invalid; the message names each variable and what it accepts."""


@dataclass(frozen=True)
class Settings:
    # repr=False keeps secrets out of repr(), logs and tracebacks that print the settings.
    telegram_bot_token: str | None = field(default=None, repr=False)
    telegram_base_url: str = DEFAULT_BASE_URL  # without the /bot<token> suffix
    admin_ids: frozenset[int] = frozenset()
    engine_url: str | None = None
    engine_token: str | None = field(default=None, repr=False)
    checkpoint_dir: Path | None = None
    device: str = "auto"
    database_path: Path = Path("var/bot.db")
    timezone: ZoneInfo = ZoneInfo("Asia/Shanghai")
    webhook_url: str | None = None
    webhook_listen: str = "127.0.0.1"  # loopback: a TLS proxy in front forwards Telegram's calls
    webhook_port: int = 8443
    webhook_secret: str | None = field(default=None, repr=False)
    rate_limit_count: int = 6  # poem requests a user may make …
    rate_limit_seconds: float = 60.0  # … within this many seconds
    daily_grace_minutes: int = 120
    retrain_hook: str | None = None  # "package.module:function", loaded by load_retrain_hook
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: dict | None = None, env_file: str | Path | None = ".env") -> Settings:
        """Settings from `env` (default os.environ) over `env_file`; raises SettingsError naming every bad variable."""
        values = read_env_file(env_file) if env_file else {}
        values.update(os.environ if env is None else env)
        values = {k: v.strip() for k, v in values.items() if isinstance(v, str) and v.strip()}
        problems: list[str] = []
        kwargs: dict = {}

        def parse(key, name, convert):
            if key in values:
                try:
                    kwargs[name] = convert(values[key])
                except (ValueError, ZoneInfoNotFoundError) as e:
                    problems.append(f"{key}: {e}")

        parse("TELEGRAM_BOT_TOKEN", "telegram_bot_token", _token)
        parse("TELEGRAM_BASE_URL", "telegram_base_url", _private_url)
        parse("ADMIN_IDS", "admin_ids", _id_set)
        parse("ENGINE_URL", "engine_url", _private_url)
        parse("ENGINE_TOKEN", "engine_token", str)
        parse("CHECKPOINT_DIR", "checkpoint_dir", Path)
        parse("DEVICE", "device", _device)
        parse("DATABASE_PATH", "database_path", Path)
        parse("TIMEZONE", "timezone", _zone)
        parse("WEBHOOK_URL", "webhook_url", _https_url)
        parse("WEBHOOK_LISTEN", "webhook_listen", _listen_address)
        parse("WEBHOOK_PORT", "webhook_port", lambda v: _int_in(v, 1, 65535))
        parse("WEBHOOK_SECRET", "webhook_secret", _secret)
        # ≥ 1: the job fires just after HH:MM:00, so a zero window would let no post through at all.
        parse("DAILY_GRACE_MINUTES", "daily_grace_minutes", lambda v: _int_in(v, 1, 24 * 60))
        parse("RETRAIN_HOOK", "retrain_hook", _hook)
        parse("LOG_LEVEL", "log_level", _log_level)
        if "RATE_LIMIT" in values:
            try:
                kwargs["rate_limit_count"], kwargs["rate_limit_seconds"] = _rate(values["RATE_LIMIT"])
            except ValueError as e:
                problems.append(f"RATE_LIMIT: {e}")
        if "webhook_url" in kwargs and "webhook_secret" not in kwargs and "WEBHOOK_SECRET" not in values:
            problems.append(WEBHOOK_SECRET_REQUIRED)
        if problems:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
        return cls(**kwargs)

    def check_webhook(self) -> None:
        """Refuse webhook mode without a strong secret: PTB checks the secret header only when one is set,
        so without it anyone who finds the URL can post forged updates (admin ids included)."""
        if self.webhook_url and not (self.webhook_secret and len(self.webhook_secret) >= MIN_SECRET_LEN):
            raise SettingsError(WEBHOOK_SECRET_REQUIRED)

    @property
    def bot_api_url(self) -> str:
        """The base_url python-telegram-bot appends the token to."""
        return self.telegram_base_url.rstrip("/") + "/bot"

    @property
    def bot_file_url(self) -> str:
        return self.telegram_base_url.rstrip("/") + "/file/bot"

    def secrets(self) -> list[str]:
        """Values that must never reach a log line (see telegram_app.RedactSecrets)."""
        return [s for s in (self.telegram_bot_token, self.engine_token, self.webhook_secret) if s]

    def load_retrain_hook(self):
        """The callable RETRAIN_HOOK names, or None; raises SettingsError if it cannot be imported."""
        if not self.retrain_hook:
            return None
        module_name, _, attr = self.retrain_hook.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise SettingsError(f"RETRAIN_HOOK: cannot load {self.retrain_hook!r}: {e}") from None

    def require_token(self) -> str:
        if not self.telegram_bot_token:
            raise SettingsError("TELEGRAM_BOT_TOKEN is not set: get one from @BotFather and put it in the "
                                "environment or .env (or try `python -m bot console`, which needs none)")
        return self.telegram_bot_token


def read_env_file(path: str | Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments, blank lines, `export` and quotes allowed); {} if absent."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:  # as bash would read it (deploy/start.sh reads the same file alike): ` #` starts a comment
            value = re.split(r"\s#", value, maxsplit=1)[0].rstrip()
        values[key.strip()] = value
    return values


def _token(value: str) -> str:
    if not TOKEN_RE.match(value):
        # Never echo the value: a token with a typo is still mostly a secret.
        raise ValueError("does not look like a bot token (<digits>:<35 letters, digits, _ or ->)")
    return value


def _url(value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value):
        raise ValueError(f"must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def _private_url(value: str) -> str:
    """An http(s) URL; plain http only to a private host, or a token would cross the internet in clear."""
    value = _url(value)
    if value.startswith("http://"):
        host = re.match(r"^http://(\[[^\]]*\]|[^:/]+)", value).group(1).strip("[]")
        if not _is_private_host(host):
            raise ValueError(f"plain http would send the token in clear over the internet: use https, or http "
                             f"only to this machine or a private network (127.0.0.1, 10.x, a compose service "
                             f"name such as haproxy), got {value!r}")
    return value


def _is_private_host(host: str) -> bool:
    """Loopback, a private or link-local address, or a name without a dot (a compose service, localhost)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            # NOTE: an IPv4 address written as one number or in fewer parts (134744072, 0x08080808, 8.526344)
            # is still an address to the HTTP client, not a name: judge the address it stands for.
            address = ipaddress.ip_address(socket.inet_aton(host))
        except (OSError, ValueError):
            return "." not in host
    return address.is_loopback or address.is_private or address.is_link_local


def _listen_address(value: str) -> str:
    """An IP address to bind the webhook server to (127.0.0.1 behind a TLS proxy)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"must be an IP address such as 127.0.0.1, got {value!r}") from None


WEBHOOK_PORTS = (443, 80, 88, 8443)  # the only ports Telegram delivers webhooks to


def _https_url(value: str) -> str:
    if not value.startswith("https://"):
        raise ValueError(f"Telegram only delivers webhooks to https URLs, got {value!r}")
    value = _url(value)
    try:
        port = urllib.parse.urlsplit(value).port
    except ValueError:
        raise ValueError(f"has a port that is not a number, got {value!r}") from None
    if port is not None and port not in WEBHOOK_PORTS:
        raise ValueError(f"Telegram delivers webhooks only to ports {', '.join(map(str, WEBHOOK_PORTS))}; "
                         f"got port {port} in {value!r}")
    return value


def _id_set(value: str) -> frozenset[int]:
    ids = set()
    for part in value.replace(";", ",").split(","):
        part = part.strip()
        if part:
            if not re.fullmatch(r"-?\d{1,20}", part):
                raise ValueError(f"must be comma-separated numeric user ids, got {part!r}")
            ids.add(int(part))
    return frozenset(ids)


def _device(value: str) -> str:
    if value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
        raise ValueError(f"must be auto, cpu or cuda, got {value!r}")
    return value


def _zone(value: str) -> ZoneInfo:
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder of zones, such as "Asia"
        raise ValueError(f"unknown time zone {value!r}; use an IANA name such as Asia/Shanghai or UTC") from None


def _int_in(value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"must be a whole number, got {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"must be between {low} and {high}, got {number}")
    return number


def _secret(value: str) -> str:
    # Telegram allows 1–256 characters of A-Z a-z 0-9 _ -; a short one can be guessed.
    if not re.fullmatch(r"[A-Za-z0-9_-]{%d,256}" % MIN_SECRET_LEN, value):
        raise ValueError(f"must be {MIN_SECRET_LEN}–256 characters of letters, digits, _ and - "
                         "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return value


def _log_level(value: str) -> str:
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {value!r}")
    return value.upper()


def _hook(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
        raise ValueError(f"must be module:function, e.g. trainer.hooks:retrain, got {value!r}")
    return value


def _rate(value: str) -> tuple[int, float]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*(?:s|sec|seconds)?\s*", value)
    if not m or int(m.group(1)) < 1 or float(m.group(2)) <= 0:
        raise ValueError(f"must be N/SECONDS with N ≥ 1, e.g. 6/60, got {value!r}")
    return int(m.group(1)), float(m.group(2))
