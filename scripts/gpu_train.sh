#!/usr/bin/env bash
# Trains a model to ship, on a fresh CUDA machine that has only this repository: the corpus travels
# preprocessed in data/packed.safetensors.xz (ignored by git; make it here first with
#   python -m trainer corpus pack --corpus ../shared/corpus/chinese-poetry --val-poems 2000 --xz \
#       --out data/packed.safetensors.xz
# and carry that file: the tree and what it carries share 64 MiB). cuDNN's LSTM/GRU kernels, bf16 autocast,
# wall-clock budget.
#   bash scripts/gpu_train.sh OUT_DIR
# OUT_DIR receives NAME.safetensors.partNNN (float16, at most 16 MiB each) with their .sha256, the
# training log and history.jsonl. Here: python -m trainer join OUT_DIR/NAME.safetensors.part000 --out …
# Every knob has an environment variable (below); tests run this script on the CPU at toy size.
# MINUTES is wall time for the whole training run, evaluations and saves included (`--deadline`): the run
# ends inside it with its cosine finished, and the export after it takes seconds.
# PATIENCE is high on purpose: the learning rate follows a cosine over MINUTES, and a run stopped at its
# first plateau (lstm-large: after 181 s of 300, at patience 6) never trains at the low rates where a
# cosine schedule gains most. The best checkpoint by validation is what is exported either way.
# INPUT_DROPOUT drops units of the embedded input, one mask per poem: against overfitting, with DROPOUT
# (docs/TRAINING.md, "Input dropout").
set -euo pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
[[ -f data/packed.safetensors.xz ]] && default_pack=data/packed.safetensors.xz || default_pack=data/packed.safetensors
: "${PACK:=$default_pack}" "${NAME:=lstm}" "${DEVICE:=cuda}" "${CELL:=lstm}" "${EMBED:=256}"
: "${HIDDEN:=1024}" "${LAYERS:=2}" "${DROPOUT:=0.3}" "${LR:=2e-3}" "${BATCH_TOKENS:=65536}" "${MINUTES:=5.5}"
: "${EVAL_EVERY:=250}" "${MAX_STEPS:=0}" "${PART_MIB:=16}" "${RUN_DIR:=/tmp/yinshi-gpu-run}" "${WEIGHT_DECAY:=0}" "${PATIENCE:=1000}"
: "${INPUT_DROPOUT:=0}"
[[ -f $PACK ]] || { echo "error: no $PACK: run python -m trainer corpus pack, and carry the file" >&2; exit 2; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c 'import torch; print("torch", torch.__version__, "cuda:", torch.cuda.is_available() and torch.cuda.get_device_name())'
rm -rf "$RUN_DIR"
python3 -m trainer train --packed "$PACK" --out "$RUN_DIR" --device "$DEVICE" --cell "$CELL" --embed-dim "$EMBED" \
    --hidden-dim "$HIDDEN" --num-layers "$LAYERS" --dropout "$DROPOUT" --input-dropout "$INPUT_DROPOUT" --lr "$LR" --batch-tokens "$BATCH_TOKENS" \
    --weight-decay "$WEIGHT_DECAY" --deadline "$MINUTES" --max-steps "$MAX_STEPS" --epochs 1000 --eval-every "$EVAL_EVERY" --patience "$PATIENCE" \
    --warmup-steps 50 --save-every 1e9 --no-progress 2>&1 | tee "$out/train.log"
python3 -m trainer export --checkpoint "$RUN_DIR/best.safetensors" --out "$out" --name "$NAME" --part-mib "$PART_MIB"
cp "$RUN_DIR/history.jsonl" "$out/history.jsonl"
