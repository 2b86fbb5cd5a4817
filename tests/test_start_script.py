"""The README's first command, deploy/start.sh, from a fresh clone: console mode, one /poem, then exit.

The clone gets a virtual environment whose packages come from the one running the tests (a `.pth` line),
so the test needs no network; the project itself is imported from the clone. Everything else is real:
the script's install check, the engine service on a free port, the trainer daemon, the console bot
reading `/poem 月` from stdin and the shipped checkpoints committed in engine/checkpoints/.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

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
               DATABASE_PATH=str(tmp_path / "bot.db"), CORPUS_DIR=str(tmp_path / "no-corpus"),
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
