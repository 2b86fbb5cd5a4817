"""What the device-row probes share (scripts/rows_compile.py): DEVICE, CHECKPOINT's
vocabulary, ROWS and STEPS from the environment, and `rows_of(n)`: n device rows of real plans (the four
forms, sampling, openings 月春山江花风云雨夜秋 in turn)."""
import os
from pathlib import Path

import torch

from engine.api import PoemRequest
from engine.model.checkpoint import DEFAULT_CHECKPOINT, read_meta
from engine.poem.constraints import build_plan
from engine.poem.device_rows import DeviceRows, device_tables
from engine.poem.prosody import prosody_for
from engine.poem.vocab import Vocab

device = torch.device(os.environ.get("DEVICE", "cuda"))
checkpoint = Path(os.environ.get("CHECKPOINT") or DEFAULT_CHECKPOINT)
sizes = [int(n) for n in os.environ.get("ROWS", "64 256").split()]
steps = int(os.environ.get("STEPS", "20"))

vocab = Vocab(read_meta(checkpoint)["vocab"])
prosody = prosody_for(vocab)
tables = device_tables(prosody, device)
FORMS = ("qijue", "wujue", "qilv", "wulv")


def rows_of(n: int) -> DeviceRows:
    plans = [build_plan(vocab, prosody, PoemRequest(prompt="月春山江花风云雨夜秋"[i % 10], form=FORMS[i % 4],
                                                    mode="sample").validate()) for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    return DeviceRows.new(tables, None, None, [(p, 1, 1.5, (0.6, 0, 1.0), gen, 0) for p in plans])


def noise_for(n: int, count: int) -> torch.Tensor:
    """(count, n, V) fixed uniform noise on the device: the walk takes each step's allowed token with the most."""
    return torch.rand(count, n, len(vocab), generator=torch.Generator().manual_seed(1)).to(device)
