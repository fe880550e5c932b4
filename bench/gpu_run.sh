#!/usr/bin/env bash
# Every GPU measurement in BENCHMARKS.md, in one go (under 8 minutes on an H200), for a lent
# CUDA machine that reaches no network. It needs CUDA torch, transformers, peft and accelerate
# installed; bitsandbytes and gguf importable (PYTHONPATH; carry bitsandbytes' wheel); triton
# comes with CUDA torch; and CONFIG_DIR holding SmolLM2-135M's config.json and tokenizer
# (save_pretrained of both). The weights are random (bench/random_model.py): speed and memory
# depend only on the shapes. Issue 17's measurements: the 8B shape (Llama-3-8B's sizes,
# SmolLM2's vocabulary) trained with the base kept in 4 bits, checkpointing off and on, and
# inside a 16 GB card's budget; the baseline with the QLoRA recipe (gradient checkpointing).
# Output: everything in $OUT/gpu.log, the tables in $OUT/tables.md (printed at the end).
#
#     OUT=/tmp/out bash bench/gpu_run.sh .gpu/smollm2
#     ONLY="model-8b train-8b" OUT=/tmp/out bash bench/gpu_run.sh .gpu/smollm2   # some steps
#
# A device call runs 10 minutes at most: if the whole script does not fit one, run the steps
# before train-8b in one call and ONLY="model-8b train-8b train-8b-ckpt train-8b-t4" in the next;
# the 70B steps (issue 18) in two more: ONLY=model-70b, then ONLY=train-70b (the NF4 70B is
# written on the CPU, 16 cores there; not timed yet).
set -u
CONFIG=${1:-.gpu/smollm2}
OUT=${OUT:-/tmp/lorakit-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/gpu.log"
SMALL=/tmp/smollm2-random
BIG=/tmp/llama3-8b-random
T4=0.107  # 15 GiB of the H200's 139.8 GiB: a 16 GB T4's usable memory
TABLES="$OUT/tables.md"
: >"$TABLES"

step() {  # step NAME SECONDS COMMAND...: run it, log all, keep the tables (lines with '|')
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    echo "=== $name: $* (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/step.txt" 2>&1
    local rc=$?
    cat "$OUT/step.txt" >>"$LOG"
    echo "--- $name: rc=$rc in $((SECONDS - start)) s" | tee -a "$LOG"
    {
        echo "### $name (rc=$rc, $((SECONDS - start)) s): $*"
        grep -E '^\||^lorakit |^baseline |passed|failed|B parameters|threads|NVIDIA' "$OUT/step.txt"
        [ "$rc" = 0 ] || tail -n 6 "$OUT/step.txt"
        echo
    } >>"$TABLES"
}

step env 30 bash -c 'nvidia-smi -L; nproc; which cc gcc; python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name())"; python3 -c "import triton; print(\"triton\", triton.__version__)"'
step model-small 60 python3 bench/random_model.py "$CONFIG" "$SMALL"
step model-8b 120 python3 bench/random_model.py "$CONFIG" "$BIG" --shape llama3-8b --device cuda
step tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_nf4.py tests/test_linear.py tests/test_triton_nf4.py tests/test_bnb_nf4.py tests/test_nf4_backend.py tests/test_lean.py tests/test_decoder.py tests/test_memory.py
step nf4 45 python3 bench/nf4_vs_bnb.py --model "$SMALL" --device cuda
T8B=(python3 bench/train_throughput.py --model "$BIG" --device cuda --per-step 4 --micro 4 --steps 3 --warmup 2 --lorakit-cache off)
step train-8b 150 "${T8B[@]}" --baseline-checkpointing
step train-8b-ckpt 90 "${T8B[@]}" --sides lorakit --lorakit-checkpointing on
step train-8b-t4 90 "${T8B[@]}" --sides lorakit --memory-fraction $T4
step generation 90 python3 bench/generation.py --model "$SMALL" --device cuda --new-tokens 64
step losses 90 python3 bench/train_throughput.py --model "$SMALL" --device cuda --sides lorakit --steps 3 --warmup 0
# Issue 18: the 70B shape within a 41 GiB budget (a 35 GB NF4 checkpoint on the machine's disk).
step model-70b 600 python3 bench/random_model.py "$CONFIG" /tmp/llama2-70b-nf4 --shape llama2-70b --nf4
step train-70b 600 python3 bench/gpu_budget_train.py /tmp/llama2-70b-nf4 --budget 41GB
rm -f "$OUT/step.txt"
cat "$TABLES"
