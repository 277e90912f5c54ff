#!/usr/bin/env bash
# Everything dinm has to check on a GPU, in one run of at most 8 minutes, each stage under its own timeout so that
# a hang still leaves the earlier figures:
#   1. build the extension in place (CUDA kernels for the GPUs torch sees) and check both ops have CUDA kernels;
#   2. tests/test_cuda.py and the op tests on "cuda" — any test skipped there counts as a failure;
#   3. the GPU benchmarks (benchmarks/bench_gpu.py: distances, edit, generate).
# Every figure goes to OUT/figures.md (with the device's name); each stage's log to OUT/<stage>.log.
#
#   bash benchmarks/gpu_check.sh [--out DIR]            # on a GPU machine: Python with a CUDA torch installed
#   bash benchmarks/gpu_check.sh --dry-run [--out DIR]  # on the CPU: tiny shapes, the CPU build; proves the script
#
# PYTHON picks the interpreter (default python3). `gguf` is not needed (no embedded model here); transformers,
# safetensors, accelerate, click, tqdm, pytest and ninja are.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=${OUT:-gpu_out}
DRY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY="--dry-run" ;;
    --out) OUT="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out DIR)"; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
FIGURES="$OUT/figures.md"
FAILED=()
START=$(date +%s)

stage() {  # stage NAME SECONDS COMMAND...: run it under a timeout, log it, remember a failure, go on
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 5 "$OUT/$name.log"
  echo "== $name: exit $rc in $(( $(date +%s) - t0 ))s"
  [ $rc -eq 0 ] || FAILED+=("$name (exit $rc)")
}

echo "# gpu_check $(date -Iseconds) ${DRY:+(dry run)}" >> "$FIGURES"
if [ -n "$DRY" ]; then
  REQUIRE=CPU
else
  REQUIRE="CPU CUDA"
fi
stage build 300 bash -c "$PY -m pip --disable-pip-version-check install -v --no-build-isolation --no-deps -e . \
  && $PY -m dinm.ops $REQUIRE | tee -a '$FIGURES'"
stage tests 150 env DINM_REQUIRE_EXT=1 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_ops.py
SUMMARY=$(tail -n 1 "$OUT/tests.log")
echo "- tests: $SUMMARY" >> "$FIGURES"
if [ -z "$DRY" ] && echo "$SUMMARY" | grep -q skipped; then FAILED+=("tests (skipped on a GPU: see $OUT/tests.log)"); fi
for bench in distances edit generate; do
  stage "bench-$bench" 150 "$PY" benchmarks/bench_gpu.py "$bench" --out "$FIGURES" $DRY
done

echo "gpu_check: $(( $(date +%s) - START ))s; figures in $FIGURES"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${FAILED[*]}"
  exit 1
fi
echo "gpu_check: every stage passed"
