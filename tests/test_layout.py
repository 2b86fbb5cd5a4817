"""The package layout's promises: the bot's process stays free of torch when it talks to an engine over HTTP,
and engine/ never imports the trainer or the bot."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BOT_OVER_HTTP = """
import sys
from bot.settings import Settings
settings = Settings.from_env({"ENGINE_URL": "http://127.0.0.1:9", "RETRAIN_HOOK": "trainer.spool:bot_retrain"},
                             env_file=None)
import bot.telegram_app, bot.daily, bot.console, bot.db
from bot.engines import make_engine
engine = make_engine(settings)
hook = settings.load_retrain_hook()
assert callable(hook)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print(type(engine).__name__, len(loaded))
"""


def test_the_bot_with_engine_url_and_its_retrain_hook_loads_no_torch():
    out = subprocess.run([sys.executable, "-c", BOT_OVER_HTTP], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["EngineClient", "0"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_module_of_the_engine_imports_the_trainer_or_the_bot():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.split(".")[0] in ("trainer", "bot"))
                 for p in (ROOT / "engine").rglob("*.py")}
    assert {p: n for p, n in offenders.items() if n} == {}


def test_the_engine_top_level_holds_at_most_eight_modules():
    top = [p.name for p in (ROOT / "engine").iterdir()
           if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").exists()]
    assert len(top) <= 8, sorted(top)
