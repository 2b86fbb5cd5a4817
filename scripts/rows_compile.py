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
backend = os.environ.get("BACKEND", "inductor")
steps = int(os.environ.get("STEPS", "20"))
modes = os.environ.get("MODES", "default").split()  # torch.compile modes, e.g. "default reduce-overhead"

vocab = Vocab(read_meta(checkpoint)["vocab"])
prosody = prosody_for(vocab)
tables = device_tables(prosody, device)
forms = ("qijue", "wujue", "qilv", "wulv")


def rows_of(n: int) -> DeviceRows:
    plans = [build_plan(vocab, prosody, PoemRequest(prompt="月春山江花风云雨夜秋"[i % 10], form=forms[i % 4],
                                                    mode="sample").validate()) for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    return DeviceRows.new(tables, None, None, [(p, 1, 1.5, (0.6, 0, 1.0), gen, 0) for p in plans])


def walk(n: int, bias, advance) -> tuple[float, torch.Tensor]:
    """`steps` steps of n rows, each taking the allowed token with the largest fixed noise: seconds a step, tokens."""
    rows = rows_of(n)
    noise = torch.rand(steps, n, len(vocab), generator=torch.Generator().manual_seed(1)).to(device)
    taken = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for s in range(steps):
        tokens = (bias(rows) + noise[s]).argmax(dim=1)
        advance(rows, tokens)
        taken.append(tokens)
    sync()
    return (time.perf_counter() - start) / steps, torch.stack(taken).cpu()


def launches(n: int, bias, advance) -> int | None:
    """Kernel launches in one step (CUDA only)."""
    if device.type != "cuda":
        return None
    rows = rows_of(n)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        advance(rows, bias(rows).argmax(dim=1))
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
