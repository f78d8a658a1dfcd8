#!/usr/bin/env bash
# Here (not on the device machine): download into .whl/ what the GPU image lacks, for setup_device.sh to install
# there. The image has torch 2.11 (cu130), triton, accelerate, tokenizers and huggingface-hub; the call carries
# .whl (the device tool's `carry`). .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
    hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions \
    transformers==5.24.0 liger-kernel==0.8.5
# DeepSpeed as its sdist: setup_device.sh builds it there without its C++/CUDA ops (DS_BUILD_OPS=0)
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8
ls .whl
