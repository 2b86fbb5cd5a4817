"""Fixtures for the engine tests: a checkpoint store holding the tiny trained lstm and gru, and settings for it.

Imported by the engine test files (`from engine_fixtures import …`; pytest puts tests/ on sys.path) rather than put in conftest.py,
which another engineer owns.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.model import versions as store
from engine.serving.local import EngineSettings


@pytest.fixture
def checkpoint_store(tmp_path, tiny_checkpoint, tiny_gru_checkpoint) -> Path:
    """A fresh store with the tiny lstm and gru published (one version each)."""
    root = tmp_path / "checkpoints"
    store.publish(root, "lstm", tiny_checkpoint)
    store.publish(root, "gru", tiny_gru_checkpoint)
    return root


@pytest.fixture
def empty_package_dir(tmp_path) -> Path:
    """A stand-in for engine/checkpoints/ with nothing in it, so tests never load the shipped models."""
    d = tmp_path / "package"
    d.mkdir()
    return d


def engine_settings(root: Path, **overrides) -> EngineSettings:
    """Small, fast settings over a test store: no watcher unless asked, short deadline."""
    # The tests pin lstm as the default model, as the product does, and leave the 词 model out.
    values = dict(checkpoint_dir=str(root), model_names=("lstm", "gru"), device="cpu", max_num_rows=64,
                  max_queue=64, watch_interval=0.0, request_timeout=60.0)
    values.update(overrides)
    return EngineSettings(**values)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
