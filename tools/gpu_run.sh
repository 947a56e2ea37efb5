#!/bin/bash
# Run a command on the GPU machine with what fi_ffi needs there. Stage first, here, from the project root:
#   ../shared/gpu/stage.sh apache-tvm-ffi==0.1.15.post2 cffi pycparser platformdirs flashinfer-python==0.6.3
# then, with `.gpu` carried:  bash tools/gpu_run.sh python3 -m pytest -q tests/
# It installs the staged wheels into /tmp/site (the machine has no network), makes flashinfer-python importable
# without its heavy __init__, pins the test kernel wheel with a user lock, and enables the GPU tests.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl .gpu/kernels/*.whl \
    2>&1 | grep -v "already exists" | tail -3
[ -d /tmp/site/flashinfer ] && printf "from .version import __version__\n" > /tmp/site/flashinfer/__init__.py
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -m fi_ffi lock .gpu/kernels/*.whl > /tmp/fi_ffi_gpu.lock
export FI_FFI_RUN_GPU_TESTS=1 FI_FFI_TEST_WHEELS=$PWD/.gpu/kernels FI_FFI_OFFLINE=1 FI_FFI_QUIET=1 \
    FI_FFI_CACHE_DIR=/tmp/fi_cache FI_FFI_LOCK=/tmp/fi_ffi_gpu.lock FI_FFI_WHEELHOUSE=$PWD/.gpu/kernels
nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader
"$@"
