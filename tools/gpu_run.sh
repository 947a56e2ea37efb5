#!/bin/bash
# Run a command on the GPU machine with what fi_ffi needs there. Stage first, here, from the project root:
#   ../shared/gpu/stage.sh apache-tvm-ffi==0.1.15.post2 cffi pycparser platformdirs flashinfer-python==0.6.3
# then, with `.gpu` carried:  bash tools/gpu_run.sh python3 -m pytest -q tests/
# It installs the staged wheels into /tmp/site (the machine has no network), makes flashinfer-python importable
# without its heavy __init__, pins the test kernel wheels with a user lock, and enables the GPU tests.
#
# FlashInfer 0.7.2: with FI_FFI_TEST_RELEASE=0.7.2 the lock also pins .gpu/kernels-072/*.whl with `priority = 1`,
# so every module the 0.7.2 wheel has comes from it and .gpu/kernels/*.whl (0.6.3) serves the rest:
#   FI_FFI_TEST_RELEASE=0.7.2 bash tools/gpu_run.sh python3 -m pytest -q tests/
# Staging for that run (the carry limit is 64 MiB): keep only the core 0.6.3 wheel in .gpu/kernels and copy the
# 0.7.2 wheel into .gpu/kernels-072 (docs: CONTRIBUTING.md, "FlashInfer 0.7.2 on the GPU").
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl .gpu/kernels/*.whl \
    2>&1 | grep -v "already exists" | tail -3
[ -d /tmp/site/flashinfer ] && printf "from .version import __version__\n" > /tmp/site/flashinfer/__init__.py
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
wheelhouse=$PWD/.gpu/kernels
case "${FI_FFI_TEST_RELEASE:-}" in
  "" | 0.6.3)
    python3 -m fi_ffi lock .gpu/kernels/*.whl > /tmp/fi_ffi_gpu.lock ;;
  0.7.2)
    if ! ls .gpu/kernels-072/*.whl > /dev/null 2>&1; then
      echo "FI_FFI_TEST_RELEASE=0.7.2: no wheel in .gpu/kernels-072 (stage ../shared/wheels-072/*.whl there)" >&2
      exit 2
    fi
    # each 0.7.x entry wins the module names it shares with 0.6.3 (the lock's `priority`)
    python3 -m fi_ffi lock .gpu/kernels/*.whl .gpu/kernels-072/*.whl \
      | sed '/^release = "0\.7\./a priority = 1' > /tmp/fi_ffi_gpu.lock
    wheelhouse=$PWD/.gpu/kernels:$PWD/.gpu/kernels-072
    export FI_FFI_TEST_WHEELS_072=$PWD/.gpu/kernels-072 ;;
  *)
    echo "FI_FFI_TEST_RELEASE: expected 0.6.3 or 0.7.2, got '$FI_FFI_TEST_RELEASE'" >&2
    exit 2 ;;
esac
export FI_FFI_RUN_GPU_TESTS=1 FI_FFI_TEST_WHEELS=$PWD/.gpu/kernels FI_FFI_OFFLINE=1 FI_FFI_QUIET=1 \
    FI_FFI_CACHE_DIR=/tmp/fi_cache FI_FFI_LOCK=/tmp/fi_ffi_gpu.lock FI_FFI_WHEELHOUSE=$wheelhouse
nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader
"$@"
