#!/usr/bin/env bash
# Every GPU measurement in BENCHMARKS.md, in one go, for a lent CUDA machine that reaches no
# network. It needs CUDA torch, transformers, peft and accelerate installed; bitsandbytes and
# gguf importable (PYTHONPATH); and CONFIG_DIR holding SmolLM2-135M's config.json and tokenizer
# (save_pretrained of both). The weights are random (bench/random_model.py): speed and memory
# depend only on the shapes. Output: everything in $OUT/gpu.log, the tables at its end.
#
#     OUT=/tmp/out bash bench/gpu_run.sh .gpu/smollm2
set -u
CONFIG=${1:-.gpu/smollm2}
OUT=${OUT:-/tmp/lorakit-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/gpu.log"
MODEL=/tmp/smollm2-random
TABLES="$OUT/tables.md"
: >"$TABLES"

step() {  # step NAME SECONDS COMMAND...: run it, log all, keep the tables (lines with '|')
    local name=$1 limit=$2
    shift 2
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

step env 30 bash -c 'nvidia-smi -L; nproc; which cc gcc; python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name())"'
step model 60 python3 bench/random_model.py "$CONFIG" "$MODEL"
step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_nf4.py tests/test_linear.py tests/test_lean.py tests/test_decoder.py tests/test_triton_nf4.py tests/test_bnb_nf4.py tests/test_nf4_backend.py
step train 120 python3 bench/train_throughput.py --model "$MODEL" --device cuda --micro 16 --steps 30 --warmup 3
step cuda-losses 60 python3 bench/train_throughput.py --model "$MODEL" --device cuda --sides lorakit --steps 3 --warmup 0
step cpu-losses 120 python3 bench/train_throughput.py --model "$MODEL" --device cpu --sides lorakit --steps 3 --warmup 0
step generation 150 python3 bench/generation.py --model "$MODEL" --device cuda --new-tokens 64
step nf4 45 python3 bench/nf4_vs_bnb.py --model "$MODEL" --device cuda
step profile 120 python3 bench/step_profile.py --config "$CONFIG" --device cuda --steps 3 --new-tokens 32
step memory-1b 120 python3 bench/train_throughput.py --model "$MODEL" --random-1b --device cuda --steps 1 --warmup 0 --per-step 4
rm -f "$OUT/step.txt"
cat "$TABLES"
