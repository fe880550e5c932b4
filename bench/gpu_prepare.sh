#!/usr/bin/env bash
# What bench/gpu_run.sh needs that the GPU machine cannot fetch, made on this machine:
# .gpu/smollm2 (SmolLM2-135M's config.json and tokenizer, no weights: 3.5 MB) and
# .whl/ (bitsandbytes' manylinux wheel, 43 MB; /.whl/ is git-ignored, so the device call
# must carry it). Then, for example:
#
#     bash bench/gpu_prepare.sh
#     device run, carry [".whl", ".gpu"]:
#       pip install -q --no-deps .whl/bitsandbytes-*.whl && OUT=$OUT bash bench/gpu_run.sh .gpu/smollm2
set -eu
python3 - <<'PY'
from lorakit.models.loading import load_config, load_tokenizer, resolve_model

source = resolve_model("smollm2")
load_config(source).save_pretrained(".gpu/smollm2")
load_tokenizer(source).save_pretrained(".gpu/smollm2")
print("wrote .gpu/smollm2")
PY
pip download -q --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 \
    --python-version 3.11 -d .whl "bitsandbytes==$(python3 -c 'import bitsandbytes; print(bitsandbytes.__version__)')"
ls -la .whl .gpu/smollm2
