"""Throughput and latency benchmark: prints a table (stderr) and JSON (stdout).

    python -m engine bench                                  # the full grid: concurrency 1 16 64 256 × greedy sample beam-5
    python -m engine bench --concurrency 1 16 --modes greedy --requests 32 --checkpoint runs/lstm/best.safetensors
    python -m engine bench --choice --threads 1                # the choice alone: C kernels vs torch primitives
    python -m engine bench --step --threads 1                  # the model step, eager and traced, beside Python
    python -m engine bench --row-state device                  # rows' decoding state as device tensors (DeviceRows)

Variants, each with `concurrency` closed-loop clients (a client sends its next request when the last one
returns) writing `--form` poems (qijue):
  unbatched  one request at a time on one worker, `decoding.generate_one` — the classic way
  engine     LocalEngine in this process (continuous batching)
  http       `python -m engine serve` in its own process on 127.0.0.1, called through EngineClient — as the bot
             calls a deployed engine (a server sharing this process would share its GIL with the clients)
  ceiling    a bare loop of batched model steps (the engine's traced step) at the same batch size, no masks,
             no scheduling
poems/s over the whole run; p50/p99 latency per request (queueing included). The ceiling's latency is
its steps per poem × its mean step time. With --repeat N every cell runs N times, the variants taking
turns, and each variant's best run is kept (as timeit keeps the best): on a shared machine a neighbour's
busy spell can slow a run by a third, and the best run is the one it touched least. The ratios then also
give engine/ceiling as the median over rounds of each engine run against the ceiling run of the same round
(`engine_vs_ceiling_paired_median`): runs side by side in time share the neighbours' load, so the ratio
of a pair varies less than either run, and the median drops the pairs a spell split.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from engine.api import PoemRequest
from engine.model import versions as store
from engine.poem.forms import FORMS
from engine.sampling.choice import Bias, choose_greedy
from engine.serving.runner import ROW_STATES

VARIANTS = ("unbatched", "engine", "http", "ceiling")
MODE_CHOICES = ("greedy", "sample", "beam")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def make_requests(mode: str, n: int, form: str, beam_width: int) -> list[PoemRequest]:
    return [PoemRequest(form=form, mode=mode, beam_width=beam_width, seed=i).validate() for i in range(n)]


async def closed_loop(call, requests: list[PoemRequest], concurrency: int) -> tuple[float, list[float]]:
    """Run `call(request)` with `concurrency` clients until all requests are done: (seconds, latencies)."""
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def client():
        while queue:
            request = queue.pop()
            t0 = time.perf_counter()
            await call(request)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def summarize(variant: str, mode: str, concurrency: int, seconds: float, latencies: list[float]) -> dict:
    return {"variant": variant, "mode": mode, "concurrency": concurrency, "requests": len(latencies),
            "poems_per_s": round(len(latencies) / seconds, 2) if seconds > 0 else None,
            "p50_ms": round(percentile(latencies, 50) * 1e3, 1), "p99_ms": round(percentile(latencies, 99) * 1e3, 1)}


async def bench_unbatched(serving, requests, concurrency) -> tuple[float, list[float]]:
    from engine.reference import generate_one

    pool = ThreadPoolExecutor(max_workers=1)  # one worker: one request at a time
    loop = asyncio.get_running_loop()

    async def call(request):
        return await loop.run_in_executor(pool, generate_one, serving.model, serving.vocab, serving.prosody, request)

    try:
        return await closed_loop(call, requests, concurrency)
    finally:
        pool.shutdown()


@torch.inference_mode()
def bench_ceiling(serving, rows: int, width: int, steps_per_poem: int, num_poems: int,
                  min_rows: int) -> tuple[float, list[float]]:
    """Batched steps with argmax fed back: `rows` rows (`width` per poem) for enough steps to write `num_poems`.
    The engine's own step function (traced), on the one thread."""
    model, step = serving.model, serving.step
    device = next(model.parameters()).device
    batch = max(rows, min_rows)  # the engine pads the same way
    tokens = torch.zeros(batch, dtype=torch.long, device=device)  # (B,)
    state = model.init_state(batch, device)  # (L, B, S)
    none = torch.zeros(0, dtype=torch.long)
    nothing_masked = Bias(torch.zeros(1, model.config.vocab_size, device=device), torch.zeros(batch, dtype=torch.long),
                          torch.zeros(batch + 1, dtype=torch.long), none, torch.zeros(0))  # one shared row of zeros
    poems_per_round = max(1, rows // width)
    rounds = -(-num_poems // poems_per_round)
    step_times = []
    start = time.perf_counter()
    for _ in range(steps_per_poem * rounds):
        t0 = time.perf_counter()
        logits, state = step(tokens, state)  # (B, V)
        tokens = choose_greedy(logits, nothing_masked)  # the engine's own pick
        tokens.tolist()  # the same one host transfer per step as the engine
        step_times.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    poem_latency = steps_per_poem * statistics.fmean(step_times)
    return seconds * num_poems / (poems_per_round * rounds), [poem_latency] * num_poems


async def run(args) -> dict:
    from engine.model.network import pick_device
    from engine.serving.local import EngineSettings, LocalEngine
    from engine.serving.registry import build_serving

    checkpoint = resolve_checkpoint(args)
    device = pick_device(args.device)
    serving = build_serving("lstm", checkpoint, device, args.quantize)
    form = FORMS[args.form]
    steps_per_poem = form.text_len + 1
    results = []
    with tempfile.TemporaryDirectory(prefix="yinshi-bench-") as tmp:
        root = Path(tmp) / "store"
        store.publish(root, "lstm", checkpoint)
        settings = EngineSettings(checkpoint_dir=str(root), model_names=("lstm",), device=args.device,
                                  max_num_rows=args.max_rows, max_queue=max(args.concurrency) * 2 + 16,
                                  watch_interval=0.0, row_state=args.row_state, quantize=args.quantize)
        engine = LocalEngine(settings)
        await engine.start()
        server = None
        try:
            if "http" in args.variants:
                from engine.serving.client import EngineClient

                server, url = await start_server(root, args, settings)
                client = EngineClient(url, timeout=600, retries=0)
            for mode in args.modes:
                for c in args.concurrency:
                    width = args.beam_width if mode == "beam" else 1
                    # Whole batches: c=64 beam-5 requests fill 255 rows with 51, so 64 of them would end on
                    # a batch of 13, and the run would time that tail; the ceiling counts full batches only.
                    fit = max(1, min(c, args.max_rows // width))  # requests one batch holds
                    n = -(-max(c, args.requests) // fit) * fit
                    requests = make_requests(mode, n, form.name, args.beam_width)
                    rows = min(c * width, args.max_rows // width * width)
                    runs = {
                        "unbatched": lambda: bench_unbatched(serving, requests, c),
                        "engine": lambda: closed_loop(engine.generate, requests, c),
                        "http": lambda: closed_loop(client.generate, requests, c),
                        "ceiling": lambda: _done(bench_ceiling(serving, rows, width, steps_per_poem, n,
                                                               settings.min_batch_rows)),
                    }
                    row, rounds = {}, []
                    for _ in range(args.repeat):  # variants take turns, so that a slow spell hits them alike
                        rounds.append({})
                        for variant in (v for v in VARIANTS if v in args.variants):
                            r = rounds[-1][variant] = summarize(variant, mode, c, *await runs[variant]())
                            if variant not in row or r["poems_per_s"] > row[variant]["poems_per_s"]:
                                row[variant] = r
                    for r in row.values():
                        r["runs_poems_per_s"] = [round(x[r["variant"]]["poems_per_s"], 2) for x in rounds]
                        results.append(r)
                        print(format_row(r), file=sys.stderr, flush=True)
            # The row state each engine really used (a model that writes 词 keeps host rows), and with
            # ENGINE_ROW_STATE=graph whether the steps were captured (capture_error says why not).
            status = await engine.status()
            row_state, graphs = {"engine": status["row_state"]}, {"engine": status["graphs"]}
            if server is not None:
                status = await client.status()
                row_state["http"], graphs["http"] = status["row_state"], status["graphs"]
        finally:
            if server is not None:
                await client.close()
                server.terminate()
                await server.wait()
            await engine.close()
    return {"device": str(device), "quantize": args.quantize if device.type == "cpu" else "none", "row_state": row_state,
            "graphs": graphs,
            "torch_threads": torch.get_num_threads(), "checkpoint": str(checkpoint),
            "model": {"cell": serving.model.config.cell, "parameters": serving.model.num_parameters(),
                      "version": serving.version},
            "form": form.name, "beam_width": args.beam_width, "results": results, "ratios": ratios(results)}


async def _done(value):
    return value


async def start_server(root: Path, args, settings) -> tuple[asyncio.subprocess.Process, str]:
    """`python -m engine serve` on a free loopback port, serving the bench's store; returns it once ready."""
    import os
    import socket

    import aiohttp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "ENGINE_MODELS": "lstm", "ENGINE_WATCH_INTERVAL": "0", "ENGINE_ROW_STATE": args.row_state,
           "ENGINE_QUANTIZE": args.quantize,
           "ENGINE_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    log = tempfile.TemporaryFile()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engine", "serve", "--port", str(port), "--checkpoints", str(root),
        "--device", args.device, "--max-rows", str(settings.max_num_rows), "--max-queue", str(settings.max_queue),
        env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if server.returncode is not None:
                break
            try:
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return server, url
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    if server.returncode is None:
        server.terminate()
    await server.wait()
    log.seek(0)
    raise RuntimeError(f"the engine server did not become ready:\n{log.read().decode(errors='replace')[-2000:]}")


def ratios(results: list[dict]) -> list[dict]:
    """The issue's targets per (mode, concurrency): engine/ceiling, engine/unbatched, p99/p50, http/engine."""
    table = {(r["mode"], r["concurrency"], r["variant"]): r for r in results}
    out = []
    for mode, c in dict.fromkeys((r["mode"], r["concurrency"]) for r in results):
        get = lambda v: table.get((mode, c, v))  # noqa: E731
        e, d, a, h = get("engine"), get("ceiling"), get("unbatched"), get("http")
        item = {"mode": mode, "concurrency": c}
        if e and d:
            item["engine_vs_ceiling"] = round(e["poems_per_s"] / d["poems_per_s"], 3)
            if len(e.get("runs_poems_per_s", ())) > 1:  # each round's engine run against the ceiling run beside it
                item["engine_vs_ceiling_paired_median"] = round(statistics.median(
                    x / y for x, y in zip(e["runs_poems_per_s"], d["runs_poems_per_s"])), 3)
        if e and a:
            item["engine_vs_unbatched"] = round(e["poems_per_s"] / a["poems_per_s"], 2)
        if e:
            item["engine_p99_over_p50"] = round(e["p99_ms"] / e["p50_ms"], 2)
        if e and h:
            item["http_vs_engine"] = round(h["poems_per_s"] / e["poems_per_s"], 3)
        out.append(item)
    return out


def format_row(r: dict) -> str:
    return (f"{r['mode']:>7} c={r['concurrency']:<4} {r['variant']:>10}: {r['poems_per_s']:>9.2f} poems/s  "
            f"p50 {r['p50_ms']:>9.1f} ms  p99 {r['p99_ms']:>9.1f} ms  ({r['requests']} requests)")


def bench_choice(rows_list=(64, 255), vocab: int = 6000, repeat: int = 5, calls: int = 30) -> list[dict]:
    """The choice after a model step on its own: the C kernels against the torch primitives on the same
    synthetic rows (logits ~ 3·N(0, 1), a third of the tokens masked, penalties on a seventh), one call
    over all rows, best of `repeat` × `calls`. Milliseconds per call."""
    from engine.sampling import kernels
    from engine.sampling.choice import beam_search_step, greedy, sample_batch

    def best_ms(fn, n=calls) -> float:
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t0) / n * 1e3)
        return round(min(times), 3)

    gen = torch.Generator().manual_seed(0)
    out = []
    with torch.inference_mode():
        for R in rows_list:
            x = torch.randn(R, vocab, generator=gen) * 3
            bias = torch.zeros(R, vocab)
            bias[:, ::3] = float("-inf")
            bias[:, 1::7] -= 1.0
            scores = torch.randn(R, generator=gen)
            cfg = (torch.full((R,), 0.8), torch.zeros(R, dtype=torch.long), torch.full((R,), 0.9),
                   torch.rand(R, generator=gen))
            torch_ops = {
                "log-sum-exp": lambda: torch.logsumexp(x, dim=-1),
                "greedy": lambda: greedy(bias + torch.log_softmax(x, dim=-1)),
                "sample (T 0.8, top-p 0.9)": lambda: sample_batch(bias + x, *cfg),
            }
            rows_bias = Bias.of_dense(bias)  # the same dense rows, for the kernels
            kernel_ops = {
                "log-sum-exp": lambda: kernels.logsumexp(x),
                "greedy": lambda: kernels.greedy(x, rows_bias),
                "sample (T 0.8, top-p 0.9)": lambda: kernels.sample(x, rows_bias, torch.arange(R), *cfg),
            }
            if R % 5 == 0:
                torch_ops["beam-5 (log-sum-exp, top-k)"] = lambda: beam_search_step(
                    (bias + scores[:, None]) + torch.log_softmax(x, dim=-1), 5)
                kernel_ops["beam-5 (log-sum-exp, top-k)"] = lambda: kernels.beam(x, rows_bias, scores, 5)
            for op, fn in torch_ops.items():
                item = {"op": op, "rows": R, "torch_ms": best_ms(fn, max(1, calls // 6))}
                if kernels.AVAILABLE:
                    item["kernel_ms"] = best_ms(kernel_ops[op])
                out.append(item)
    return out


@torch.inference_mode()
def bench_step(model, rows: int = 64, calls: int = 20) -> list[dict]:
    """The model step eager and traced (engine.model.network.compile_step), alone and beside a thread spinning in
    Python, as the engine's catch-up thread runs beside its step: median milliseconds per step. "traced,
    kept inputs" passes what the engine passes (engine.model.network.kept_step_inputs): ordinary tensors that a view also
    holds from C++, so that the step takes the GIL only to return."""
    import threading

    from engine.model.network import compile_step, kept_step_inputs

    device = next(model.parameters()).device
    tokens = torch.zeros(rows, dtype=torch.long, device=device)
    state = model.init_state(rows, device)
    kept = kept_step_inputs(model, rows)
    traced = compile_step(model)
    out = []
    for name, step, (tokens, state) in (("eager", model.step, (tokens, state)), ("traced", traced, (tokens, state)),
                                        ("traced, kept inputs", traced, kept[:2])):
        for beside in ("nothing", "python"):
            stop = threading.Event()

            def spin():
                while not stop.is_set():
                    sum(range(1000))

            spinner = threading.Thread(target=spin) if beside == "python" else None
            step(tokens, state)  # warm
            if spinner:
                spinner.start()
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                step(tokens, state)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            stop.set()
            if spinner:
                spinner.join()
            out.append({"step": name, "beside": beside, "rows": rows, "ms": round(statistics.median(times), 3)})
    return out


def resolve_checkpoint(args) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    if args.checkpoints:
        path = store.current_path(Path(args.checkpoints), "lstm")
        if path is not None:
            return path
    from engine.model.checkpoint import DEFAULT_CHECKPOINT

    path = DEFAULT_CHECKPOINT
    if not path.is_file():
        raise SystemExit(f"no checkpoint: pass --checkpoint PATH or --checkpoints DIR (no {path})")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="a .safetensors checkpoint (default: the shipped default model)")
    parser.add_argument("--checkpoints", default=None, help="a store: benchmark its CURRENT lstm")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--modes", nargs="+", default=list(MODE_CHOICES), choices=MODE_CHOICES)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--requests", type=int, default=64,
                        help="requests per cell: at least the concurrency, rounded up to whole batches")
    parser.add_argument("--form", default="qijue", choices=list(FORMS))
    parser.add_argument("--beam-width", type=int, default=5)
    parser.add_argument("--max-rows", type=int, default=256, help="engine batch rows per step")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quantize", default="none", choices=["none", "int8"],
                        help="run the model as int8 on a CPU (ENGINE_QUANTIZE), every variant alike")
    parser.add_argument("--row-state", default="host", choices=list(ROW_STATES),
                        help="where the engine keeps the rows' decoding state (ENGINE_ROW_STATE)")
    parser.add_argument("--choice", action="store_true",
                        help="only time the choice after a model step: the C kernels against the torch primitives")
    parser.add_argument("--step", action="store_true",
                        help="only time the model step, eager and traced, alone and beside a busy Python thread")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run every cell this many times, variants in turn, and keep each variant's best run")


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.choice:
        report = {"torch_threads": torch.get_num_threads(), "choice": bench_choice()}
        for r in report["choice"]:
            print(f"{r['op']:>28} {r['rows']:>4} rows: torch {r['torch_ms']:7.2f} ms  "
                  f"kernel {r.get('kernel_ms', float('nan')):7.2f} ms", file=sys.stderr)
        print(json.dumps(report, indent=2))
        return 0
    if args.step:
        from engine.model.checkpoint import load_checkpoint
        from engine.model.network import pick_device, quantize_int8

        device = pick_device(args.device)
        model = load_checkpoint(resolve_checkpoint(args), device=device).model
        if args.quantize == "int8" and device.type == "cpu":
            model = quantize_int8(model)
        report = {"torch_threads": torch.get_num_threads(), "quantize": args.quantize, "step": bench_step(model)}
        for r in report["step"]:
            print(f"{r['step']:>19} step, {r['rows']} rows, beside {r['beside']:>7}: {r['ms']:8.2f} ms", file=sys.stderr)
        print(json.dumps(report, indent=2))
        return 0
    report = asyncio.run(run(args))
    print("\n" + "\n".join(json.dumps(r) for r in report["ratios"]), file=sys.stderr)
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0
