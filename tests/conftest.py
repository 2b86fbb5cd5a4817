"""Shared fixtures: a tiny synthetic corpus in the chinese-poetry layout and tiny trained checkpoints.

The poems are random arrangements of common characters (never text from the real corpus), laid out
in the four regular forms, so every test runs in seconds on 2 cores.
"""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# Common characters with both tones and many rhyme groups (东 阳 尤 真 先 庚 …), so constrained decoding
# always has candidates.
FIXTURE_CHARS = (
    "月山水花风云春秋天人江河日夜明清白青长空中东西南北来去归飞流高深远近寒香红落"
    "声心情思知时诗书家乡城楼台亭舟帆鸟雁莺燕龙马松竹梅兰草木林溪泉石雪霜雨露烟霞"
    "光阳阴晴朝暮年生何无有不见闻望登临行游歌酒杯琴灯窗门前后里外上下一千万重孤"
    "轻新旧古今金玉珠衣裳身名功成开关寻逢相别离愁欢笑泪梦魂仙僧寺钟声边关沙尘波浪"
)


# Request options every decoding test runs through, and an acrostic per line count.
ACROSTIC = {4: "春山秋水", 8: "春山秋水东南西北"}
DECODING_OPTIONS = {
    "plain": {},
    "prompt": {"prompt": "明月"},
    "long prompt": {"prompt": "白云明月山水花风"},
    "acrostic": {"acrostic": True},
    "no rhyme": {"rhyme": False},
    "no tone": {"tone": False},
    "neither": {"rhyme": False, "tone": False},
}


def free_port() -> int:
    """A loopback port nobody listens on right now (for servers started in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_poems(n: int, seed: int = 0) -> list[str]:
    """n synthetic poems in the regular forms, as upstream paragraphs joined with ，。"""
    rng = random.Random(seed)
    poems = []
    for i in range(n):
        num_lines, line_len = [(4, 5), (4, 7), (8, 5), (8, 7)][i % 4]
        lines = ["".join(rng.choice(FIXTURE_CHARS) for _ in range(line_len)) for _ in range(num_lines)]
        poems.append("".join(line + ("，" if j % 2 == 0 else "。") for j, line in enumerate(lines)))
    return poems


def write_corpus(root: Path, poems: list[str], per_file: int = 50) -> Path:
    """Write poems as chinese-poetry's 全唐诗/poet.tang.N.json files; returns root."""
    d = root / "全唐诗"
    d.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(poems), per_file):
        records = []
        for j, text in enumerate(poems[k : k + per_file]):
            half = text.index("。") + 1 if "。" in text else len(text)
            records.append({"author": "佚名", "title": f"无题{k + j}", "id": f"fixture-{k + j}",
                            "paragraphs": [p for p in (text[:half], text[half:]) if p]})
        (d / f"poet.tang.{k * 20}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return root


# Line lengths (and the marks after them) of the synthetic 词 tunes; "\n" is not part of the data.
CI_SHAPES = {
    "浣溪沙": ((7, "，"), (7, "，"), (7, "。"), (7, "，"), (7, "，"), (7, "。")),
    "如梦令": ((6, "，"), (6, "。"), (5, "，"), (6, "。"), (2, "，"), (2, "。"), (6, "。")),
    "十六字令": ((1, "，"), (7, "。"), (3, "，"), (5, "。")),
}


def make_ci(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n synthetic 词 as (tune, text), cycling through CI_SHAPES."""
    rng = random.Random(seed)
    out = []
    tunes = list(CI_SHAPES)
    for i in range(n):
        tune = tunes[i % len(tunes)]
        text = "".join("".join(rng.choice(FIXTURE_CHARS) for _ in range(length)) + mark
                       for length, mark in CI_SHAPES[tune])
        out.append((tune, text))
    return out


def write_ci_corpus(root: Path, ci: list[tuple[str, str]], per_file: int = 50) -> Path:
    """Write 词 as chinese-poetry's 宋词/ci.song.N.json files; returns root."""
    d = root / "宋词"
    d.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(ci), per_file):
        records = [{"author": "佚名", "rhythmic": tune, "paragraphs": [text]} for tune, text in ci[k : k + per_file]]
        (d / f"ci.song.{k * 20}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_ci_corpus(tmp_path_factory) -> Path:
    """Regular poems and 词 side by side, as in the real corpus."""
    root = tmp_path_factory.mktemp("ci_corpus")
    write_corpus(root, make_poems(100, seed=3))
    return write_ci_corpus(root, make_ci(300, seed=2))


@pytest.fixture(scope="session")
def tiny_ci_checkpoint(tiny_ci_corpus, tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny LSTM fine-tuned on the tiny 词: its vocabulary has tune tokens."""
    return train_tiny(tiny_ci_corpus, tmp_path_factory.mktemp("ci"), "lstm", kind="ci", init_from=str(tiny_checkpoint),
                      tune_tokens=2)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), make_poems(400, seed=1))


def train_tiny(corpus: Path, out: Path, cell: str = "lstm", steps: int = 40, **overrides) -> Path:
    """Really train a tiny model for a few steps; returns its best.safetensors."""
    from trainer.train import Trainer, TrainConfig

    cfg = TrainConfig(corpus=[str(corpus)], out=str(out), cell=cell, embed_dim=16, hidden_dim=32,
                      num_layers=1, dropout=0.0, max_steps=steps, eval_every=steps, eval_poems=40,
                      batch_tokens=512, min_count=1, warmup_steps=5, lr=1e-2, threads=1, half=False,
                      **overrides)
    Trainer(cfg, log=lambda m: None).run(progress_bar=False)
    return out / "best.safetensors"


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_corpus, tmp_path_factory) -> Path:
    """A tiny trained LSTM checkpoint (fp32) on the fixture corpus."""
    return train_tiny(tiny_corpus, tmp_path_factory.mktemp("lstm"), "lstm")


@pytest.fixture(scope="session")
def tiny_gru_checkpoint(tiny_corpus, tmp_path_factory) -> Path:
    return train_tiny(tiny_corpus, tmp_path_factory.mktemp("gru"), "gru")
