"""Where a GPU step's time goes: N greedy requests (256) on CHECKPOINT (the default model), the milliseconds
per engine step, then torch.profiler's table (the CUDA runtime calls and the GPU's own kernel time).

    python3 scripts/gpu_profile.py graph|device|host   # ENGINE_ROW_STATE; gpu_check.sh runs graph
    DEVICE=cpu CHECKPOINT=… N=8 python3 scripts/gpu_profile.py host    # the same on a CPU (the tests do)
"""
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.api import PoemRequest
from engine.model import versions as store
from engine.model.checkpoint import DEFAULT_CHECKPOINT
from engine.serving.local import EngineSettings, LocalEngine

rows = sys.argv[1] if len(sys.argv) > 1 else "device"
device = os.environ.get("DEVICE", "cuda")
checkpoint = Path(os.environ.get("CHECKPOINT") or DEFAULT_CHECKPOINT)
requests = [PoemRequest(form="qijue", mode="greedy", seed=i).validate() for i in range(int(os.environ.get("N", "256")))]


async def main():
    with tempfile.TemporaryDirectory() as tmp:
        store.publish(Path(tmp), "lstm", checkpoint)
        settings = EngineSettings(checkpoint_dir=tmp, model_names=("lstm",), device=device, watch_interval=0.0,
                                  row_state=rows)
        async with LocalEngine(settings) as engine:
            await asyncio.gather(*(engine.generate(r) for r in requests))  # warm
            start, steps = time.perf_counter(), engine.num_steps
            await asyncio.gather(*(engine.generate(r) for r in requests))
            seconds, steps = time.perf_counter() - start, engine.num_steps - steps
            print(f"{rows} rows on {device}: {steps} steps, {seconds / steps * 1e3:.2f} ms a step")
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.startswith("cuda"):
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                await asyncio.gather(*(engine.generate(r) for r in requests))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))


asyncio.run(main())
