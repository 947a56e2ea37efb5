#!/bin/bash
# The GPU-marked suite on the GPU machine, spread over its GPUs, inside one device call's time. Run it under
# tools/gpu_run.sh (which installs the staged wheels, pins the test wheels and sets FI_FFI_RUN_GPU_TESTS=1):
#   bash tools/gpu_run.sh bash tools/gpu_suite.sh [--budget SECONDS] [--tp] [--only REGEX]
# The test files that hold GPU tests (those marked `gpu` or reading FI_FFI_RUN_GPU_TESTS) are dealt to the GPUs
# (CUDA_VISIBLE_DEVICES, one pytest each, greedily by file size); the tensor-parallel files, which need two GPUs,
# run afterwards over all of them with --tp (and only then). Each pytest gets --budget seconds (default 480) and is
# then interrupted (SIGINT), so it still prints its summary and the tests that failed so far: a call never ends with
# nothing to show. Every shard's summary line and failures are printed at the end; the logs go to $OUT where the
# device tool set it (they come back), else to /tmp/gpu_suite; a shard's "[exit 124]" says the budget cut it. Exit
# status: 0 when every shard passed.
set -u
budget=480 tp=0 only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) budget=$2; shift 2 ;;
    --tp) tp=1; shift ;;
    --only) only=$2; shift 2 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (expected --budget SECONDS, --tp, --only REGEX)" >&2; exit 2 ;;
  esac
done
logs=${OUT:-/tmp/gpu_suite}
mkdir -p "$logs"
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
[ "$gpus" -ge 1 ] || { echo "gpu_suite.sh: no GPU found (nvidia-smi)" >&2; exit 2; }
tp_files="tests/comm/test_gpu_comm.py tests/engine/test_gpu_llama_tp.py tests/engine/test_gpu_moe_tp.py
tests/engine/test_gpu_family_tp.py"
files=$(grep -rlE "mark\.gpu|FI_FFI_RUN_GPU_TESTS" tests --include='test_*.py' | grep -v '^tests/package/' | sort)
files=$(for f in $files; do case " $(echo $tp_files) " in *" $f "*) ;; *) echo "$f" ;; esac; done)
[ -n "$only" ] && files=$(echo "$files" | grep -E "$only")
# deal the files to the GPUs, largest first, each to the GPU with the fewest bytes so far
declare -a shard size
for ((g = 0; g < gpus; g++)); do shard[g]=""; size[g]=0; done
for f in $([ -n "$files" ] && ls -S $files); do
  best=0
  for ((g = 1; g < gpus; g++)); do [ "${size[g]}" -lt "${size[best]}" ] && best=$g; done
  shard[best]="${shard[best]} $f"
  size[best]=$((size[best] + $(stat -c %s "$f")))
done
run() {  # name, CUDA_VISIBLE_DEVICES, files...: one pytest under the budget, interrupted (not killed) at its end
  local name=$1 devices=$2
  shift 2
  CUDA_VISIBLE_DEVICES=$devices timeout -s INT -k 30 "$budget" python3 -m pytest -q -p no:cacheprovider -rfE \
    --tb=line "$@" > "$logs/$name.log" 2>&1
  echo "exit $?" >> "$logs/$name.log"
}
start=$(date +%s)
for ((g = 0; g < gpus; g++)); do [ -n "${shard[g]}" ] && echo "gpu$g:${shard[g]}"; done
for ((g = 0; g < gpus; g++)); do
  [ -n "${shard[g]}" ] && run "gpu$g" "$g" ${shard[g]} &
done
wait
if [ "$tp" = 1 ]; then
  run tp "$(seq -s, 0 $((gpus - 1)))" $tp_files
fi
status=0
for log in "$logs"/*.log; do
  name=$(basename "$log" .log)
  summary=$(grep -E "^[0-9]+ (passed|failed|skipped|error)|^=+ .*(passed|failed|error|skipped|interrupted).* =+$|no tests ran" "$log" | tail -1)
  echo "== $name: ${summary:-no summary (see $log)} [$(tail -1 "$log")]"
  grep -E "^(FAILED|ERROR) " "$log" | head -20
  grep -q "^exit 0$" "$log" || status=1
done
echo "== $(($(date +%s) - start)) s, logs in $logs"
exit $status
