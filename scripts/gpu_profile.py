"""Where a GPU step's time goes: 256 greedy requests on the shipped LSTM, the milliseconds per engine step,
then torch.profiler's table (the CUDA runtime calls and the GPU's own kernel time).

    python3 scripts/gpu_profile.py device|host      # ENGINE_ROW_STATE; run by scripts/gpu_check.sh
"""
import asyncio
import sys
import time

import torch

from engine.api import PoemRequest
from engine.serving.local import EngineSettings, LocalEngine

rows = sys.argv[1] if len(sys.argv) > 1 else "device"
reqs = [PoemRequest(form="qijue", mode="greedy", seed=i).validate() for i in range(256)]

async def main():
    async with LocalEngine(EngineSettings(model_names=("lstm",), device="cuda", watch_interval=0.0, row_state=rows)) as e:
        await asyncio.gather(*(e.generate(r) for r in reqs))
        t = time.perf_counter(); s0 = e.num_steps
        await asyncio.gather(*(e.generate(r) for r in reqs))
        dt = time.perf_counter() - t; steps = e.num_steps - s0
        print(rows, f"{steps} steps, {dt / steps * 1e3:.2f} ms/step")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            await asyncio.gather(*(e.generate(r) for r in reqs))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))
asyncio.run(main())
