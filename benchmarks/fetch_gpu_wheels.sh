#!/usr/bin/env bash
# Fetch the wheels the GPU device lacks into .gpu-wheels/ (git-ignored), for its Python 3.12 on x86_64 Linux.
#
# The device has torch, transformers, timm, peft and pyarrow (and their dependencies: numpy, pillow via
# torchvision, regex, tqdm, huggingface_hub, fsspec, safetensors, tokenizers, packaging) but no Ray, no
# open_clip, no faiss and no network; benchmarks/gpu_check.sh installs these with --no-index. Versions are
# the project's pins (.ci/constraints.txt). Sizes as fetched on 2026-12-03:
#
#   faiss_cpu-1.15.1-cp310-abi3-manylinux_2_27/2_28_x86_64     18.8 MB
#   pydantic_core-2.50.4-cp312-cp312-manylinux2014_x86_64        2.3 MB
#   open_clip_torch-3.3.0-py3-none-any                           1.5 MB
#   wcwidth-0.9.4-cp310-abi3-manylinux2014_x86_64                0.8 MB
#   pydantic-2.14.3-py3-none-any                                 0.5 MB
#   fsspec-2026.9.0, typing_extensions-4.16.0, ftfy-6.3.1,
#   typing_inspection-0.4.5, annotated_types-0.8.0               < 0.3 MB together
#                                                        total ~ 24 MB (the device's carry limit: 64 MiB)
#
# faiss-gpu-cu12 (1.14.1.post1) is a 48.4 MB wheel: it would fit alone, but it needs the CUDA 12 runtime and
# cuBLAS wheels (nvidia-cuda-runtime-cu12, nvidia-cublas-cu12, hundreds of MB) unless the device's torch
# brought them, and it would not fit next to faiss-cpu. FAISS=gpu fetches it instead of faiss-cpu (then the
# check's search row runs faiss on the GPU where it imports); the default is faiss-cpu, and the check's GPU
# reference for search is an exact torch matmul top-k.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # then: run `bash benchmarks/gpu_check.sh`, carry .gpu-wheels
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.gpu-wheels}
PYVER=${PYVER:-3.12}  # the device's Python; another value only for a dry run elsewhere
PIP=${PIP:-.venv/bin/pip}
pin() { grep -i -E "^$1==" .ci/constraints.txt | head -1; }
faiss=$(pin faiss-cpu)
if [ "${FAISS:-cpu}" = gpu ]; then faiss=faiss-gpu-cu12==1.14.1.post1; fi
pkgs=("$faiss" "$(pin open_clip_torch)" "$(pin ftfy)" "$(pin wcwidth)" "$(pin pydantic)" "$(pin pydantic_core)"
      "$(pin annotated-types)" "$(pin typing-inspection)" "$(pin typing_extensions)" "$(pin fsspec)")
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PIP" download --quiet --no-deps --only-binary :all: --implementation cp --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DEST" "${pkgs[@]}"
ls -l "$DEST"/*.whl | awk '{printf "%8.1f MB  %s\n", $5 / 1e6, $NF}'
du -cb "$DEST"/*.whl | tail -1 | awk '{printf "total %.1f MB\n", $1 / 1e6}'
