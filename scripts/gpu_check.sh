#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine whose Python already has torch, aiohttp, prometheus-client and
# safetensors (the rest of the engine's needs come as wheels in .whl/, when there is no package index):
#   bash scripts/gpu_check.sh OUT_DIR
# In order of what a short lease most needs: the CUDA tests (OUT_DIR/tests_cuda.log); the engine benchmark with
# the rows in captured CUDA graphs (ENGINE_ROW_STATE=graph: OUT_DIR/bench_cuda_graph.json, the table in .log);
# the host's share of such a step, the device's work skipped (scripts/host_step.py: OUT_DIR/host_step.log);
# where such a step's time goes (scripts/gpu_profile.py: OUT_DIR/profile_cuda.log); the device rows' step
# eager against torch.compile (scripts/rows_compile.py: OUT_DIR/rows_compile.log); then the benchmark with the
# rows on the device and on the host (bench_cuda_{device,host}.json). Every knob is an environment variable
# (below); tests run it on the CPU at toy size (DEVICE=cpu SKIP_TESTS=1).
set -uo pipefail
out=${1:-${OUT:-.}}
: "${DEVICE:=cuda}" "${CHECKPOINT:=engine/checkpoints/lstm-large.safetensors}" "${CONCURRENCY:=64 256}"
: "${REQUESTS:=256}" "${PROFILE_REQUESTS:=256}" "${SKIP_TESTS:=0}"
: "${COMPILE_ROWS:=64 256}" "${COMPILE_BACKEND:=inductor}" "${COMPILE_MODES:=default reduce-overhead}" "${COMPILE_TIMEOUT:=150}"
: "${BENCH_VARIANTS:=engine http ceiling}" "${HOST_CONCURRENCY:=256}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [[ $DEVICE == cuda* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
fi
if [[ $SKIP_TESTS != 1 ]]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_cuda.py 2>&1 | tee "$out/tests_cuda.log" | tail -5
fi
bench() {
    # shellcheck disable=SC2086  # CONCURRENCY is a list
    python3 -m engine bench --device "$DEVICE" --checkpoint "$CHECKPOINT" --row-state "$1" --concurrency $CONCURRENCY \
        --requests "$REQUESTS" --variants $BENCH_VARIANTS >"$out/bench_cuda_$1.json" 2> >(tee "$out/bench_cuda_$1.log" >&2)
}
bench graph
CHECKPOINT=$CHECKPOINT C=$HOST_CONCURRENCY python3 scripts/host_step.py >"$out/host_step.log" 2>&1
DEVICE=$DEVICE CHECKPOINT=$CHECKPOINT N=$PROFILE_REQUESTS python3 scripts/gpu_profile.py graph >"$out/profile_cuda.log" 2>&1
DEVICE=$DEVICE CHECKPOINT=$CHECKPOINT ROWS=$COMPILE_ROWS BACKEND=$COMPILE_BACKEND MODES=$COMPILE_MODES timeout "$COMPILE_TIMEOUT" python3 scripts/rows_compile.py \
    >"$out/rows_compile.log" 2>&1
bench device
bench host
