"""deploy/systemd: the bot token reaches the bot's unit only, and the units agree with deploy/compose.yaml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
COMPOSE = SYSTEMD.parent / "compose.yaml"
BOT_ENV = "/opt/yinshi/.env"  # the operator's file with TELEGRAM_BOT_TOKEN (compose's --env-file .env)
UNITS = ("yinshi-bot", "yinshi-engine", "yinshi-trainer")


def unit(name: str) -> dict[str, list[str]]:
    """A unit's settings, "Section.Key" -> values in order (a key may repeat, as EnvironmentFile= may)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in (SYSTEMD / f"{name}.service").read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def env_files(name: str) -> list[str]:
    return [v.lstrip("-") for v in unit(name).get("Service.EnvironmentFile", [])]


def inline_environment(name: str) -> dict[str, str]:
    pairs = " ".join(unit(name).get("Service.Environment", [])).split()
    return dict(p.split("=", 1) for p in pairs)


def compose_names(service: str) -> set[str]:
    """The variables compose passes to `service` by name (`NAME:` with no value: taken from the --env-file)."""
    text = COMPOSE.read_text()
    block = re.search(rf"^  {service}:\n(.*?)(?=^  \S|^\S|\Z)", text, re.DOTALL | re.MULTILINE).group(1)
    return set(re.findall(r"^      ([A-Z][A-Z0-9_]*):\s*$", block, re.MULTILINE))


def test_only_the_bot_unit_reads_the_file_with_the_bot_token():
    assert env_files("yinshi-bot") == [BOT_ENV]
    for name in ("yinshi-engine", "yinshi-trainer"):
        assert BOT_ENV not in env_files(name), name
        assert "TELEGRAM_BOT_TOKEN" not in inline_environment(name), name


@pytest.mark.parametrize("name", ["yinshi-engine", "yinshi-trainer"])
def test_the_engine_and_trainer_cannot_open_the_bot_s_env_file_either(name):
    """They run as the same user in the same directory, so leaving the file out of EnvironmentFile= alone
    would not keep a compromised engine from reading it."""
    hidden = " ".join(unit(name).get("Service.InaccessiblePaths", [])).split()
    assert BOT_ENV in [p.lstrip("-") for p in hidden], hidden


@pytest.mark.parametrize("name, service", [("yinshi-engine", "engine"), ("yinshi-trainer", "trainer")])
def test_each_unit_names_the_variables_compose_gives_its_service(name, service):
    """Compose hands the engine and trainer their variables by name; the unit's own env file must be told to
    carry the same ones, so its comment lists them (and nothing compose keeps from that service)."""
    text = (SYSTEMD / f"{name}.service").read_text()
    wanted = compose_names(service)
    assert wanted, service
    missing = sorted(v for v in wanted if not re.search(rf"\b{v}\b", text))
    assert missing == [], missing
    if "ENGINE_TOKEN" not in wanted:
        assert "ENGINE_TOKEN" not in text, name


@pytest.mark.parametrize("name", UNITS)
def test_every_yinshi_unit_a_unit_orders_itself_after_exists(name):
    """A Wants=/After= naming a unit that does not exist is ignored by systemd without a word."""
    settings = unit(name)
    named = {u for key in ("Unit.After", "Unit.Wants", "Unit.Requires", "Unit.BindsTo")
             for value in settings.get(key, []) for u in value.split() if u.startswith("yinshi-")}
    assert {u for u in named if not (SYSTEMD / u).exists()} == set()
