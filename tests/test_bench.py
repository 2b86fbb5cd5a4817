"""`python -m engine bench` end to end on the tiny checkpoint: every variant runs (http through a real
`python -m engine serve` subprocess) and the report holds the numbers the README's table is made of."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine.serving.bench import bench_choice, bench_step, percentile, ratios


def test_bench_runs_every_variant_and_reports_ratios(tiny_checkpoint, tmp_path):
    cmd = [sys.executable, "-m", "engine", "bench", "--checkpoint", str(tiny_checkpoint), "--concurrency", "1", "3",
           "--requests", "3", "--modes", "greedy", "beam", "--beam-width", "2", "--form", "wujue", "--threads", "1",
           "--repeat", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    cells = {(r["mode"], r["concurrency"], r["variant"]): r for r in report["results"]}
    assert set(cells) == {(m, c, v) for m in ("greedy", "beam") for c in (1, 3)
                          for v in ("unbatched", "engine", "http", "ceiling")}
    assert all(r["requests"] == 3 and r["poems_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in cells.values())
    assert all(len(r["runs_poems_per_s"]) == 2 and r["poems_per_s"] == max(r["runs_poems_per_s"])
               for r in cells.values())  # --repeat 2: the best of two runs
    assert {(r["mode"], r["concurrency"]) for r in report["ratios"]} == {(m, c) for m in ("greedy", "beam") for c in (1, 3)}
    assert all({"engine_vs_ceiling", "engine_vs_ceiling_paired_median", "engine_vs_unbatched", "http_vs_engine"}
               <= set(r) for r in report["ratios"])
    assert report["form"] == "wujue" and report["torch_threads"] == 1
    assert "engine_vs_ceiling" in done.stderr  # the table and ratios go to stderr


def test_ratios_and_percentiles_are_computed_from_the_cells():
    results = [{"variant": v, "mode": "greedy", "concurrency": 4, "poems_per_s": n, "p50_ms": 10.0, "p99_ms": 20.0}
               for v, n in (("engine", 50.0), ("ceiling", 100.0), ("unbatched", 5.0), ("http", 45.0))]
    (r,) = ratios(results)
    assert (r["engine_vs_ceiling"], r["engine_vs_unbatched"], r["http_vs_engine"], r["engine_p99_over_p50"]) == \
        (0.5, 10.0, 0.9, 2.0)
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0 and percentile([1.0, 2.0], 99) == 2.0
    assert "engine_vs_ceiling_paired_median" not in r  # one round: no pairs to take the median of


def test_the_paired_ratio_is_the_median_of_each_rounds_engine_over_its_ceiling():
    # Round 2 is a slow spell for the ceiling alone: best-of pairs the engine's best with the ceiling's best,
    # the paired median takes the rounds one by one.
    runs = {"engine": [80.0, 90.0, 70.0], "ceiling": [100.0, 60.0, 100.0]}
    results = [{"variant": v, "mode": "beam", "concurrency": 64, "poems_per_s": max(n), "runs_poems_per_s": n,
                "p50_ms": 10.0, "p99_ms": 20.0} for v, n in runs.items()]
    (r,) = ratios(results)
    assert r["engine_vs_ceiling"] == 0.9 and r["engine_vs_ceiling_paired_median"] == 0.8  # median(0.8, 1.5, 0.7)


def test_bench_choice_times_every_op_on_both_paths():
    report = bench_choice(rows_list=(5,), vocab=300, repeat=1, calls=2)
    assert [r["op"] for r in report] == ["log-sum-exp", "greedy", "sample (T 0.8, top-p 0.9)",
                                         "beam-5 (log-sum-exp, top-k)"]
    assert all(r["rows"] == 5 and r["torch_ms"] > 0 and r["kernel_ms"] > 0 for r in report)


def test_bench_step_times_the_eager_and_the_traced_step_alone_and_beside_python(tiny_checkpoint):
    from engine.model.checkpoint import load_checkpoint

    report = bench_step(load_checkpoint(tiny_checkpoint).model, rows=16, calls=3)
    assert [(r["step"], r["beside"]) for r in report] == [
        (step, beside) for step in ("eager", "traced", "traced, kept inputs") for beside in ("nothing", "python")]
    assert all(r["rows"] == 16 and r["ms"] > 0 for r in report)


def test_bench_passes_the_row_state_to_the_engine_and_the_server(tiny_checkpoint):
    cmd = [sys.executable, "-m", "engine", "bench", "--checkpoint", str(tiny_checkpoint), "--concurrency", "2",
           "--requests", "2", "--modes", "sample", "--form", "wujue", "--threads", "1", "--variants", "engine", "http",
           "--row-state", "device"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["row_state"] == {"engine": {"lstm": "device"}, "http": {"lstm": "device"}}


def test_the_gpu_check_script_runs_end_to_end_at_toy_size_on_the_cpu(tiny_checkpoint, tmp_path):
    # scripts/gpu_check.sh is what a lent GPU runs; here every part of it but the CUDA tests, on the CPU.
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, DEVICE="cpu", CHECKPOINT=str(tiny_checkpoint), CONCURRENCY="2", REQUESTS="2",
               PROFILE_REQUESTS="4", SKIP_TESTS="1",
               COMPILE_ROWS="4", COMPILE_BACKEND="aot_eager", COMPILE_MODES="default", HOST_CONCURRENCY="16")
    out = tmp_path / "OUT"
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ms a step" in (out / "profile_cuda.log").read_text()
    assert "device work skipped" in (out / "host_step.log").read_text()
    assert "True" in (out / "rows_compile.log").read_text().splitlines()[-1]  # compiled and eager rows agree
    for rows in ("graph", "device", "host"):
        report = json.loads((out / f"bench_cuda_{rows}.json").read_text())
        assert report["row_state"] == {"engine": {"lstm": rows}, "http": {"lstm": rows}}
        assert {r["variant"] for r in report["results"]} == {"engine", "http", "ceiling"}
        graphs = report["graphs"]["engine"]  # on a CPU the graph batch steps eagerly: nothing captured
        assert (len(graphs), sum(g["captured"] for g in graphs)) == ((1, 0) if rows == "graph" else (0, 0))
