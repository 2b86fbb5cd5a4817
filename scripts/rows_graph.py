"""What would one CUDA graph per step save? The device rows' bias, a choice and their advance, captured once
as a CUDA graph on ROWS rows of real plans and replayed, against the same step run eagerly: milliseconds a
step, and whether both write the same tokens.

    python3 scripts/rows_graph.py                      # run by scripts/gpu_check.sh (DEVICE=cuda)
    DEVICE=cpu ROWS=8 python3 scripts/rows_graph.py    # the plumbing, quickly (the tests): no capture on a CPU

A graph replays fixed addresses, but `advance` rebinds some of the rows' tensors (`self.pos = self.pos + 1`).
So the captured step ends by copying every rebound tensor back into the tensor it started from; eagerly, the
same step with the same copies must write the same tokens (checked here on any device). The engine's batch
changes its rows as requests join and leave, which a real capture has to meet with fixed-size buckets; this
probe keeps one batch and measures only what the launches cost.
"""
import sys
import time

import torch
from rows_probe import (  # scripts/ is on sys.path
    device,
    noise_for,
    rows_of,
    sizes,
    steps,
)

from engine.poem.device_rows import DeviceRows


def stepper(rows: DeviceRows, noise: torch.Tensor, index: torch.Tensor, out: torch.Tensor):
    """One step in place: the allowed token with the largest noise of step `index`, written to `out`, and every
    rebound tensor copied back into the one it started from (what a replayed graph needs)."""
    kept = {name: getattr(rows, name) for name in rows._tensors()}

    def step():
        bias, bent = rows.bias()
        tokens = (bias + noise.index_select(0, index)[0]).argmax(dim=1)
        rows.advance(tokens, bent)
        out.copy_(tokens)
        index.add_(1)
        for name, tensor in kept.items():
            if getattr(rows, name) is not tensor:
                tensor.copy_(getattr(rows, name))
                setattr(rows, name, tensor)

    return step


def walk(n: int, graphed: bool) -> tuple[float, torch.Tensor]:
    """`steps` steps of n rows, eager or replaying a captured graph: seconds a step, the tokens taken."""
    rows = rows_of(n)
    noise = noise_for(n, steps + 4)
    index = torch.zeros(1, dtype=torch.long, device=device)
    out = torch.zeros(n, dtype=torch.long, device=device)
    step = stepper(rows, noise, index, out)
    run = step
    if graphed:
        # NOTE: warm up on a side stream first (cuBLAS and the caching allocator set up outside the capture),
        # then start the walk again from the same rows.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        rows = rows_of(n)
        index.zero_()
        step = stepper(rows, noise, index, out)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        # The capture ran nothing: start from the rows as they were, then replay.
        fresh = rows_of(n)
        for name in rows._tensors():
            getattr(rows, name).copy_(getattr(fresh, name))
        index.zero_()
        run = graph.replay
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    taken = []
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        run()
        taken.append(out.clone())
    sync()
    return (time.perf_counter() - start) / steps, torch.stack(taken).cpu()


def main() -> int:
    print(f"{'rows':>5} {'eager ms':>9} {'graph ms':>9} same")
    for n in sizes:
        walk(n, False)  # warm
        te, oe = walk(n, False)
        if device.type == "cuda":
            try:
                tg, og = walk(n, True)
            except Exception as e:  # noqa: BLE001  NOTE: the probe says why a capture failed and goes on
                print(f"{n:>5} {te * 1e3:>9.2f}  capture failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
        else:  # no capture on a CPU: the in-place step, eagerly, against the plain one
            rows, noise = rows_of(n), noise_for(n, steps + 4)
            plain = []
            for s in range(steps):
                bias, bent = rows.bias()
                tokens = (bias + noise[s]).argmax(dim=1)
                rows.advance(tokens, bent)
                plain.append(tokens)
            tg, og = te, torch.stack(plain)
        print(f"{n:>5} {te * 1e3:>9.2f} {tg * 1e3:>9.2f} {torch.equal(oe, og)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
