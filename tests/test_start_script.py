"""The README's first command, deploy/start.sh, from a fresh clone: console mode, one /poem, then exit.

The clone gets a virtual environment whose packages come from the one running the tests (a `.pth` line),
so the test needs no network; the project itself is imported from the clone. Everything else is real:
the script's install check, the engine service on a free port, the trainer daemon, the console bot
reading `/poem 月` from stdin and the shipped checkpoints committed in engine/checkpoints/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

from bot.settings import read_env_file
from conftest import free_port
from engine.poem.forms import FORMS, split_lines

ROOT = Path(__file__).resolve().parents[1]


def test_start_script_answers_a_poem_from_a_fresh_clone_without_a_token(tmp_path):
    clone = tmp_path / "yinshi"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    assert (clone / "engine" / "checkpoints" / "lstm.safetensors").is_file(), "shipped checkpoint not committed"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(clone / ".venv")], check=True)
    site = next((clone / ".venv" / "lib").glob("python3*/site-packages"))
    (site / "outer-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "ENGINE_", "WEBHOOK_"))}
    env.update(ENGINE_PORT=str(free_port()), CHECKPOINT_DIR=str(tmp_path / "store"),
               DATABASE_PATH=str(tmp_path / "bot.db"), CORPUS_DIR=str(tmp_path / "no-corpus"), CORPUS_DOWNLOAD="off",
               PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(["bash", "deploy/start.sh"], cwd=clone, env=env, input="/poem 月\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # The console prints a poem a couplet to a line: "月……，……。"
    out = done.stdout.splitlines()
    start = next((i for i, line in enumerate(out) if line.startswith("月")), None)
    assert start is not None, done.stdout
    couplets = []
    for line in out[start:]:
        if not re.fullmatch(r"[^，。\s]+，[^，。\s]+。", line.strip()):
            break
        couplets.append(line.strip())
    lines = split_lines("".join(couplets))
    assert len(lines) == FORMS["qijue"].num_lines and all(len(line) == 7 for line in lines), done.stdout
    # The script stopped what it started: nothing listens on the engine port any more.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(env["ENGINE_PORT"]))) != 0


# -- the script's own logic, in a second or two: a stand-in for the venv's python records what each child gets ----

# Answers the checks the script makes (`-m pip --version`, the import check, the engine's readiness: success; is a
# trainer daemon running: no). The engine, trainer and bot append their argv and the YT_* and watched variables
# to $T_LOG; then the engine and the trainer wait to be stopped, and the bot exits.
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys, time
args = sys.argv[1:]
if "daemon_running" in " ".join(args):
    sys.exit(1)
if args[:1] == ["-m"] and args[1] in ("engine", "trainer", "bot"):
    watched = ("TELEGRAM_BOT_TOKEN", "WEBHOOK_SECRET", "ENGINE_TOKEN", "TIMEZONE", "LOG_LEVEL", "RETRAIN_CRON")
    env = {{k: v for k, v in os.environ.items() if k.startswith("YT_") or k in watched}}
    with open(os.environ["T_LOG"], "a") as f:
        f.write(json.dumps({{"role": args[1], "argv": args, "env": env}}) + "\\n")
    if args[1] != "bot":
        time.sleep(60)
"""

# `python3 -m venv DIR` as it goes on a Debian without python3-venv (DIR/bin/python made, then ensurepip fails,
# leaving a python without pip behind) or, with T_VENV_OK=1, as it succeeds (with the stand-in above).
FAKE_PYTHON3 = """#!/bin/bash
[[ $1 == -m && $2 == venv ]] || exit 2
mkdir -p "$3/bin"
if [[ ${T_VENV_OK:-0} == 1 ]]; then
    cp "$T_GOOD_PYTHON" "$3/bin/python"
    exit 0
fi
printf '#!/bin/sh\\necho "No module named pip" >&2; exit 1\\n' > "$3/bin/python"
chmod +x "$3/bin/python"
echo "Error: ensurepip is not available" >&2
exit 1
"""


def script_copy(tmp_path: Path, venv: bool = True) -> Path:
    """deploy/start.sh alone in a directory, with the stand-in as .venv/bin/python (`venv`) and as $PYTHON's venv."""
    repo = tmp_path / "repo"
    (repo / "deploy").mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "start.sh", repo / "deploy" / "start.sh")
    for name, text in (("good-python", FAKE_PYTHON), ("python3", FAKE_PYTHON3)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    if venv:
        (repo / ".venv" / "bin").mkdir(parents=True)
        shutil.copy(tmp_path / "good-python", repo / ".venv" / "bin" / "python")
    return repo


def run_script(tmp_path: Path, repo: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    """Run the copy; returns the result and what each child recorded, by role."""
    log = tmp_path / "children.jsonl"
    log.unlink(missing_ok=True)
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "T_LOG": str(log),
            "T_GOOD_PYTHON": str(tmp_path / "good-python"), "PYTHON": str(tmp_path / "python3"),
            "ENGINE_PORT": str(free_port())}
    done = subprocess.run(["bash", "deploy/start.sh"], cwd=repo, env={**base, **env}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    children = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        child = json.loads(line)
        children[child["role"]] = child
    return done, children


def test_the_environment_wins_over_env_and_the_bot_s_secrets_reach_the_bot_only(tmp_path):
    repo = script_copy(tmp_path)
    token = "123456:" + "A" * 35
    (repo / ".env").write_text(f"TELEGRAM_BOT_TOKEN='{token}'\nWEBHOOK_SECRET=s3cret\nENGINE_TOKEN=e\n"
                               "TIMEZONE=UTC\nLOG_LEVEL=DEBUG   # more talk\nRETRAIN_CRON=\"15 3 * * *\"\n")
    done, children = run_script(tmp_path, repo, TIMEZONE="Europe/Berlin")
    assert done.returncode == 0, done.stderr
    assert set(children) == {"engine", "trainer", "bot"}, done.stderr
    bot = children["bot"]
    assert bot["argv"] == ["-m", "bot", "run"]
    assert bot["env"] == {"TELEGRAM_BOT_TOKEN": token, "WEBHOOK_SECRET": "s3cret", "ENGINE_TOKEN": "e",
                          "TIMEZONE": "Europe/Berlin", "LOG_LEVEL": "DEBUG", "RETRAIN_CRON": "15 3 * * *"}
    # The engine and the trainer get the settings, not the bot's secrets (nor, for the trainer, the engine's).
    for role, hidden in (("engine", {"TELEGRAM_BOT_TOKEN", "WEBHOOK_SECRET"}),
                         ("trainer", {"TELEGRAM_BOT_TOKEN", "WEBHOOK_SECRET", "ENGINE_TOKEN"})):
        assert children[role]["env"] == {k: v for k, v in bot["env"].items() if k not in hidden}, role


def test_the_script_reads_env_as_the_bot_does(tmp_path):
    """Not sourced: the same KEY=VALUE reading as bot/settings.py's read_env_file, nothing expanded."""
    repo = script_copy(tmp_path)
    env_file = repo / ".env"
    env_file.write_text("\n".join([
        "# a comment", "", "  export YT_A='x # y'  ", 'YT_B="a quoted value"', "YT_C=plain   # trailing comment",
        "YT_D=with#hash", "YT_E=   ", "YT_F='unbalanced", "YT_G=$HOME/$(echo no)`echo no`", "YT_H=a=b",
        "YT_I=first", "YT_I=second", " YT_J = padded\t", "not a setting", 'YT_K="a" # quoted, then a comment',
        "YT_ENV=from the file", "YT_L=the last line, without a newline"]))
    done, children = run_script(tmp_path, repo, YT_ENV="from the environment")
    assert done.returncode == 0, done.stderr
    expected = {k: v for k, v in read_env_file(env_file).items() if k.startswith("YT_")}
    assert len(expected) == 13, expected
    got = {k: v for k, v in children["bot"]["env"].items() if k.startswith("YT_")}
    assert got == {**expected, "YT_ENV": "from the environment"}


def test_a_venv_that_python3_m_venv_left_half_made_is_made_again(tmp_path):
    """Debian without python3-venv: `python3 -m venv` leaves .venv/bin/python without pip behind; every later
    run found the python, skipped making the venv and died on "No module named pip"."""
    repo = script_copy(tmp_path, venv=False)
    done, children = run_script(tmp_path, repo)  # $PYTHON's venv fails as Debian's does
    assert done.returncode != 0 and children == {}
    assert "python3-venv" in done.stderr, done.stderr
    assert not (repo / ".venv").exists()  # nothing half-made left to trip the next run

    # A venv an earlier run (or an older script) left without pip is noticed and made again.
    (repo / ".venv" / "bin").mkdir(parents=True)
    broken = repo / ".venv" / "bin" / "python"
    broken.write_text('#!/bin/sh\necho "No module named pip" >&2; exit 1\n')
    broken.chmod(0o755)
    done, children = run_script(tmp_path, repo, T_VENV_OK="1", YINSHI_NO_TRAINER="1")
    assert done.returncode == 0, done.stderr
    assert set(children) == {"engine", "bot"} and children["bot"]["argv"] == ["-m", "bot", "console"]
