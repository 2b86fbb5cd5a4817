"""Would torch.compile fuse the device rows' step? DeviceRows.bias and .advance, eager against compiled, on
ROWS rows of real plans (CHECKPOINT's vocabulary, the four forms, sampling): milliseconds a step, kernel
launches a step on a GPU, and whether both write the same tokens.

    python3 scripts/rows_compile.py                         # run by scripts/gpu_check.sh (DEVICE=cuda)
    MODES="default reduce-overhead" python3 scripts/rows_compile.py   # and with inductor's CUDA graphs
    DEVICE=cpu ROWS=8 BACKEND=aot_eager python3 scripts/rows_compile.py   # the plumbing, quickly (the tests)

NOTE: on the 2-core CPU inductor's code for these two functions was slower than eager (the gathers inside
the (R, V) loops become per-element indirect loads); the question is the GPU's, where the eager step is
bound by some 250 launches.
"""
import os
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

backend = os.environ.get("BACKEND", "inductor")
modes = os.environ.get("MODES", "default").split()  # torch.compile modes, e.g. "default reduce-overhead"


def walk(n: int, bias, advance) -> tuple[float, torch.Tensor]:
    """`steps` steps of n rows, each taking the allowed token with the largest fixed noise: seconds a step, tokens."""
    rows = rows_of(n)
    noise = noise_for(n, steps)
    taken = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for s in range(steps):
        b, bent = bias(rows)
        tokens = (b + noise[s]).argmax(dim=1)
        advance(rows, tokens, bent)
        taken.append(tokens)
    sync()
    return (time.perf_counter() - start) / steps, torch.stack(taken).cpu()


def launches(n: int, bias, advance) -> int | None:
    """Kernel launches in one step (CUDA only)."""
    if device.type != "cuda":
        return None
    rows = rows_of(n)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        b, bent = bias(rows)
        advance(rows, b.argmax(dim=1), bent)
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch"))


def main() -> int:
    eager = (DeviceRows.bias, DeviceRows.advance)
    print(f"{'mode':>16} {'rows':>5} {'eager ms':>9} {'compiled ms':>12} {'launches eager':>15} {'compiled':>9} same")
    for mode in modes:
        torch._dynamo.reset()
        try:
            # NOTE: reduce-overhead also replays CUDA graphs, one per shape: static shapes, as the engine's
            # batch-size buckets would be.
            compiled = (torch.compile(DeviceRows.bias, backend=backend, mode=mode, dynamic=mode == "default"),
                        torch.compile(DeviceRows.advance, backend=backend, mode=mode, dynamic=mode == "default"))
            start = time.perf_counter()
            for n in sizes:
                walk(n, *compiled)
            print(f"compiled ({backend}, {mode}) in {time.perf_counter() - start:.1f} s for {sizes} rows")
        except Exception as e:  # noqa: BLE001  NOTE: a GPU image without a working Triton says so and the check goes on
            print(f"torch.compile ({backend}, {mode}) failed: {type(e).__name__}: {e}")
            continue
        for n in sizes:
            walk(n, *eager)  # warm
            (te, oe), (tc, oc) = walk(n, *eager), walk(n, *compiled)
            print(f"{mode:>16} {n:>5} {te * 1e3:>9.2f} {tc * 1e3:>12.2f} {launches(n, *eager)!s:>15} "
                  f"{launches(n, *compiled)!s:>9} {torch.equal(oe, oc)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
