"""deploy/systemd: the bot token reaches the bot's unit only, and the units agree with deploy/compose.yaml."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
COMPOSE = SYSTEMD.parent / "compose.yaml"
ENV_EXAMPLE = SYSTEMD.parent.parent / ".env.example"
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
    pairs = shlex.split(" ".join(unit(name).get("Service.Environment", [])))  # "A=b c" is one pair
    return dict(p.split("=", 1) for p in pairs)


def compose_names(service: str) -> set[str]:
    """The variables compose passes to `service` by name (`NAME:` with no value: taken from the --env-file)."""
    text = COMPOSE.read_text()
    block = re.search(rf"^  {service}:\n(.*?)(?=^  \S|^\S|\Z)", text, re.DOTALL | re.MULTILINE).group(1)
    return set(re.findall(r"^      ([A-Z][A-Z0-9_]*):[ \t]*(?:#.*)?$", block, re.MULTILINE))


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


# -- what each process gets, as systemd would start it -----------------------------------------------------------

def env_file_values(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads an EnvironmentFile= (comment lines skipped, enclosing quotes removed)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def start(name: str, env_file: str, tmp_path: Path, instance: str = "8081") -> dict:
    """Run the unit's ExecStart= with its Environment= and then `env_file` as its EnvironmentFile= (which overrides
    Environment=, per systemd.exec), the venv's python replaced by a stand-in that reports its argv and environment."""
    stub = tmp_path / "python"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}))\n")
    stub.chmod(0o755)
    settings = unit(name)
    env = {"PATH": "/usr/bin:/bin", **inline_environment(name)}
    if settings.get("Service.EnvironmentFile"):
        env.update(env_file_values(env_file))
    [line] = settings["Service.ExecStart"]
    line = line.replace("/opt/yinshi/.venv/bin/python", str(stub)).replace("%i", instance).replace("%%", "%")
    done = subprocess.run(shlex.split(line), env=env, capture_output=True, text=True, check=True, timeout=30)
    return json.loads(done.stdout)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_what_the_units_fix_wins_over_their_environment_files(tmp_path):
    """EnvironmentFile= overrides Environment=: a .env copied from .env.example (ENGINE_URL empty) made the bot
    start an in-process engine instead of using yinshi-engine, and an env file naming another CHECKPOINT_DIR
    parted a unit from the store the others use."""
    example = ENV_EXAMPLE.read_text()
    moved = example + "\nCHECKPOINT_DIR=/srv/elsewhere\n"
    engine = start("yinshi-engine", example, tmp_path)
    bot = start("yinshi-bot", example, tmp_path)["env"]
    host, port = option(engine["argv"], "--host"), option(engine["argv"], "--port")
    assert bot["ENGINE_URL"] == f"http://{host}:{port}"
    assert inline_environment("yinshi-haproxy")["HAPROXY_BIND"] == f"{host}:{port}"  # the replicas' front
    assert bot["RETRAIN_HOOK"] == "trainer.spool:bot_retrain"
    assert start("yinshi-bot", example + "\nRETRAIN_HOOK=\n", tmp_path)["env"]["RETRAIN_HOOK"] == ""  # /retrain off

    stores = {
        "yinshi-bot": start("yinshi-bot", moved, tmp_path)["env"]["CHECKPOINT_DIR"],
        "yinshi-trainer": start("yinshi-trainer", moved, tmp_path)["env"]["CHECKPOINT_DIR"],
        "yinshi-engine": option(start("yinshi-engine", moved, tmp_path)["argv"], "--checkpoints"),
        "yinshi-engine@": option(start("yinshi-engine@", moved, tmp_path)["argv"], "--checkpoints"),
    }
    assert set(stores.values()) == {"/opt/yinshi/var/checkpoints"}, stores
    for name in stores:  # a store each unit may write to (ProtectSystem=strict)
        writable = " ".join(unit(name).get("Service.ReadWritePaths", [])).split()
        assert any(Path(stores[name]).is_relative_to(p) for p in writable), name
    # The bot's database: where .env puts it, under the directory the unit may write to.
    assert (Path(unit("yinshi-bot")["Service.WorkingDirectory"][0]) / bot["DATABASE_PATH"]).is_relative_to(
        "/opt/yinshi/var")


# -- deploy/compose.yaml and .env.example ---------------------------------------------------------------------

def compose_value(service: str, name: str) -> str:
    """The value compose.yaml writes for `name` in `service`'s environment, as written (quotes removed)."""
    block = re.search(rf"^  {service}:\n(.*?)(?=^  \S|^\S|\Z)", COMPOSE.read_text(), re.DOTALL | re.MULTILINE).group(1)
    return re.search(rf"^      {name}:[ \t]*(.*?)[ \t]*$", block, re.MULTILINE).group(1).strip("\"'")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's variable substitution: ${NAME}, ${NAME-default} (unset only) and ${NAME:-default} (unset or empty)."""
    def one(m):
        name, op, default = m.groups()
        if name in variables and (op != ":-" or variables[name]):
            return variables[name]
        return default if op else ""
    return re.sub(r"\$\{(\w+)(:?-)?([^}]*)\}", one, value)


@pytest.mark.parametrize("env, hook", [({}, "trainer.spool:bot_retrain"), ({"RETRAIN_HOOK": ""}, ""),
                                       ({"RETRAIN_HOOK": "trainer.spool:bot_retrain_force"},
                                        "trainer.spool:bot_retrain_force")])
def test_compose_takes_the_bot_s_retrain_hook_from_env(env, hook):
    """.env.example: "Empty = /retrain off"; compose's `environment:` wins over the bot's env_file, so a fixed value
    there left /retrain on whatever .env said."""
    assert interpolate(compose_value("bot", "RETRAIN_HOOK"), env) == hook


def test_compose_gives_the_trainer_each_documented_variable_it_reads():
    """RETRAIN_NPROC was documented in .env.example but never reached the trainer's container; CORPUS_BASE_URL
    reached it but was not documented."""
    trainer = COMPOSE.parent.parent / "trainer"
    read = {name for path in trainer.glob("*.py")
            for name in re.findall(r"""(?:env|environ)(?:\.get\(|\[)["']([A-Z][A-Z0-9_]*)["']""", path.read_text())}
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    shared = re.search(r"^x-env: &env\n((?:  .*\n)+)", COMPOSE.read_text(), re.MULTILINE).group(1)  # <<: *env
    given = compose_names("trainer") | set(re.findall(r"^  ([A-Z][A-Z0-9_]*):", shared, re.MULTILINE))
    assert {"CHECKPOINT_DIR", "RETRAIN_TIME_BUDGET"} <= read  # the scan finds what it should
    assert sorted((read & documented) - given) == []
    assert sorted(compose_names("trainer") - documented) == []
