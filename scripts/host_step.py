"""How fast could the graph rows' step loop go if the device took no time? The engine with
ENGINE_ROW_STATE=graph, its captured step (GraphBatch._body) replaced by nothing, serves N greedy 七绝 at
concurrency C: what is left is the host's share of every step (scheduling, placing joining rows, reading
finished poems, the asyncio hand-offs, each request's plan). Its poems/s bound the engine on any GPU.

    python3 scripts/host_step.py                 # C=256, N=4·C, CHECKPOINT's vocabulary; run by scripts/gpu_check.sh
The poems it returns are not poems (no step ran); it replaces the one function that would notice.
"""
import asyncio
import os
import tempfile
import time
from pathlib import Path

import torch

from engine.api import PoemRequest
from engine.model import versions as store
from engine.poem.device_rows import DeviceRows
from engine.serving import graph_batch
from engine.serving.local import EngineSettings, LocalEngine

C = int(os.environ.get("C", "256"))
N = int(os.environ.get("N", str(4 * C)))
CHECKPOINT = Path(os.environ.get("CHECKPOINT", "engine/checkpoints/lstm.safetensors"))


def unread(plan, tokens, flagged):
    """DeviceRows.result's unflagged path: a text no step wrote would be replayed, and refused."""
    lines = [tuple(tokens[s:s + n]) for s, n in zip(plan.layout.starts, plan.layout.line_lengths)]
    return ["".join(plan.vocab.tokens[t] for t in line) for line in lines], list(plan.notes)


async def main():
    graph_batch.GraphBatch._body = lambda self, slab: None
    DeviceRows.result = staticmethod(unread)
    torch.set_num_threads(1)
    requests = [PoemRequest(form="qijue", mode="greedy", seed=i).validate() for i in range(N)]
    with tempfile.TemporaryDirectory() as tmp:
        store.publish(Path(tmp), "lstm", CHECKPOINT)
        settings = EngineSettings(checkpoint_dir=tmp, model_names=("lstm",), device="cpu", watch_interval=0.0,
                                  row_state="graph", max_num_rows=max(C, 16), max_queue=N + 16)
        async with LocalEngine(settings) as engine:
            await asyncio.gather(*(engine.generate(r) for r in requests[:C]))  # warm
            slots = asyncio.Semaphore(C)

            async def one(request):
                async with slots:
                    return await engine.generate(request)

            start, steps = time.perf_counter(), engine.num_steps
            await asyncio.gather(*(one(r) for r in requests))
            seconds, steps = time.perf_counter() - start, engine.num_steps - steps
    full = N * 33 / C  # a 七绝 is 33 steps: the steps a batch kept full would take
    print(f"greedy c={C}, device work skipped: {N / seconds:.0f} poems/s, {seconds / steps * 1e3:.2f} ms a step, "
          f"{steps} steps ({steps / full:.1f}x a full batch's)")


if __name__ == "__main__":
    asyncio.run(main())
