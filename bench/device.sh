#!/usr/bin/env bash
# One prepared GPU session: check the GPU, install peers from local wheels, then the steps in order of priority,
# each given what is left of one time budget: issue 12's memory-floor runs, issue 11's bitwise tests and cost
# ratios, `fusedpg verify`, the whole test suite, the whole benchmark suite. Every log and result lands in OUTDIR.
#
#   bash bench/device.sh OUTDIR [--wheels DIR] [--budget SECONDS] [--pack FILE] [--dry-run]
#
#   --wheels DIR      pip-install the pure-Python peers (liger-kernel, cut-cross-entropy; bench/device_wheels.sh
#                     downloads them) from DIR with --no-index --no-deps: nothing is downloaded, torch/triton stay.
#   --budget SECONDS  wall-clock budget of the whole script (default 480). A step runs under the smaller of its
#                     own limit and what is left (less a reserve for the pack); a step with under 20 s left is
#                     skipped and says so in summary.txt. Benchmark steps stop starting measurements in time.
#   --pack FILE       after every step, re-write FILE as a .tgz of OUTDIR: a device run returns few files, and a
#                     run cut short by its caller's timeout still returns every step that finished.
#   --dry-run         exercise the script on CPU (no GPU check, no tests, the tiniest shapes), for CI.
#
# OUTDIR gets: device.log (all output), summary.txt (exit code and end time of each step), nvidia-smi.txt,
# pip-freeze.txt, floor-linear/ and floor-pg/ (issue 12), parity.txt and parity-cost/ (issue 11), verify.txt,
# pytest.txt, bench/ (results.json, results.csv, rows.jsonl, table.md, plots). Each results.json goes to
# bench/results/ as described in bench/results/README.md (python -m fusedpg.bench.collect OUTDIR does it).
set -uo pipefail

usage() { echo "usage: bash bench/device.sh OUTDIR [--wheels DIR] [--budget SECONDS] [--pack FILE] [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
WHEELS=""; DRY=0; BUDGET=480; PACK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || usage; WHEELS=$2; shift 2 ;;
    --budget) [ $# -ge 2 ] && [[ $2 =~ ^[0-9]+$ ]] || usage; BUDGET=$2; shift 2 ;;
    --pack) [ $# -ge 2 ] || usage; PACK=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) usage ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -n "$PACK" ]; then mkdir -p "$(dirname "$PACK")" && PACK=$(cd "$(dirname "$PACK")" && pwd)/$(basename "$PACK"); fi
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
LOG="$OUT/device.log"
: > "$LOG"; : > "$OUT/summary.txt"
START=$(date +%s)
RESERVE=10  # seconds kept for the last pack and the summary

log() { echo "[device.sh $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( START + BUDGET - RESERVE - $(date +%s) )); }
pack() {
  [ -n "$PACK" ] || return 0
  tar czf "$PACK.tmp" -C "$OUT" . 2>/dev/null && mv -f "$PACK.tmp" "$PACK"
}
# minutes NOMINAL_SECONDS: a benchmark's --max-minutes, the smaller of its share and what is left, less 40 s for
# the measurement in flight when the limit passes and for writing the results.
minutes() {
  local s=$1 l; l=$(( $(left) - 40 ))
  [ "$l" -lt "$s" ] && s=$l
  [ "$s" -lt 10 ] && s=10
  $PY -c "print(round($s / 60, 2))"
}
# step NAME FILE MAX_SECONDS CMD...: run CMD under the smaller of MAX_SECONDS and the time left, output to FILE and
# the log; its exit code (124: stopped at its limit) goes to summary.txt.
step() {
  local name=$1 file=$2 limit=$3; shift 3
  local l; l=$(left)
  [ "$l" -lt "$limit" ] && limit=$l
  if [ "$limit" -lt 20 ]; then
    echo "$name skipped: budget spent ($(( $(date +%s) - START ))s)" >> "$OUT/summary.txt"
    log "$name: skipped, ${l}s of the budget left"
    return 0
  fi
  log "$name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$file" 2>&1
  local rc=$?
  cat "$file" >> "$LOG"
  echo "$name rc=$rc ($(( $(date +%s) - START ))s)" >> "$OUT/summary.txt"
  log "$name: rc=$rc"
  pack
  return $rc
}

log "repo $(pwd), commit $($PY -c "from fusedpg.bench.report import git_commit; print(git_commit())" 2>/dev/null || echo unknown), out $OUT, budget ${BUDGET}s, dry-run=$DRY"
if [ "$DRY" = 1 ]; then
  log "dry run: GPU check skipped"
  echo "dry run: no GPU check" > "$OUT/nvidia-smi.txt"
else
  step nvidia-smi "$OUT/nvidia-smi.txt" 30 nvidia-smi || log "nvidia-smi failed (continuing to the torch check)"
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "torch.cuda.is_available() is False: no GPU for this run"; echo "gpu-check rc=1" >> "$OUT/summary.txt"
    pack; exit 2
  fi
  $PY -c "import torch; p = torch.cuda.get_device_properties(0); print('gpu', p.name, p.total_memory >> 30, 'GiB')" \
    | tee -a "$LOG"
fi

# The working tree may arrive without the package installed; an editable install needs no download.
if ! $PY -c "import fusedpg.bench" 2>/dev/null; then
  step install "$OUT/install.txt" 120 $PY -m pip install --no-deps --no-index --no-build-isolation -e . || exit 2
fi

if [ -n "$WHEELS" ]; then
  for peer in liger-kernel cut-cross-entropy; do
    if [ "$DRY" = 1 ]; then
      log "dry run: would run: $PY -m pip install --no-index --no-deps --find-links $WHEELS $peer"
    else
      step "wheel-$peer" "$OUT/pip-$peer.txt" 60 $PY -m pip install --no-index --no-deps --find-links "$WHEELS" \
        "$peer" || log "peer $peer not installed: its rows will say missing"
    fi
  done
fi
$PY -m pip freeze 2>/dev/null | grep -i -E 'torch|triton|fusedpg|liger|cut.cross|transformers|numpy|matplotlib|tqdm' \
  > "$OUT/pip-freeze.txt" || true
log "pip freeze (subset): $(tr '\n' ' ' < "$OUT/pip-freeze.txt")"

if [ "$DRY" = 1 ]; then
  FLOOR=16x8x32; SWEEP=(--shape 8x8x32 --shape 16x8x16); DEV=cpu; COST=16x8x32
  BENCH_ARGS=(--quick --shape 16x8x32 --shape 4+2x2 --reps 1 --warmup 0)
  ONE=(env OMP_NUM_THREADS=1)  # tiny shapes on a loaded machine otherwise wait for time slices between threads
else
  FLOOR=8192x4096x151936; DEV=cuda; COST=4096x4096x151936
  # after the judged shape, while time is left: N and V sweeps through it (the memory-against-N/V plot's points)
  SWEEP=(--shape 2048x4096x151936 --shape 4096x4096x151936 --shape 8192x4096x32000 --shape 8192x4096x65536)
  BENCH_ARGS=(); ONE=()
fi
BENCH="$PY -m fusedpg.cli bench --device $DEV --no-progress"

# Issue 12 first, so that a short slot yields it before anything else: extra peak memory of ours and ours-low
# against the bytes of d_weight, with Liger, CCE, eager and the three-GEMM floor beside them.
step floor-linear "$OUT/floor-linear.txt" 130 "${ONE[@]}" $BENCH --out "$OUT/floor-linear" --case linear \
  --shape "$FLOOR" "${SWEEP[@]}" --impl ours,ours-low,floor,cce,liger,eager --dtype bf16 --mode fwd+bwd --reps 3 \
  --max-minutes "$(minutes 90)"
step floor-pg "$OUT/floor-pg.txt" 100 "${ONE[@]}" $BENCH --out "$OUT/floor-pg" --case pg --shape "$FLOOR:dapo" \
  --impl ours,ours-low,floor,liger,eager --dtype bf16 --mode fwd+bwd --reps 3 --max-minutes "$(minutes 60)" --no-plots

# Issue 11: the bitwise tests on CUDA (and the one host read), then the cost ratios: deterministic vs default,
# truncated (Triton chunk logits and select) vs untruncated.
if [ "$DRY" = 1 ]; then
  echo "dry run: tests not run (the tests run this script)" > "$OUT/parity.txt"
else
  step parity "$OUT/parity.txt" 150 $PY -m pytest -q -p no:cacheprovider tests/test_deterministic.py \
    tests/test_host_sync.py tests/test_accumulate_mm.py tests/test_truncation.py tests/test_otr.py \
    tests/test_kernel_compile.py
fi
step parity-cost "$OUT/parity-cost.txt" 100 "${ONE[@]}" $BENCH --out "$OUT/parity-cost" --case linear,logits,sampler \
  --shape "$COST" --impl ours,ours-det,untruncated --dtype bf16 --mode fwd+bwd --reps 5 --max-minutes "$(minutes 60)" \
  --no-plots

if [ "$DRY" = 1 ]; then
  step verify "$OUT/verify.txt" 60 "${ONE[@]}" $PY -m fusedpg.cli verify --device cpu --dtype fp32 --only primitives
  echo "dry run: tests not run" > "$OUT/pytest.txt"
else
  step verify "$OUT/verify.txt" 60 $PY -m fusedpg.cli verify --device cuda
  # no -x: a test that assumes a CPU-only machine must not hide the rest of the GPU run's results
  step pytest "$OUT/pytest.txt" 150 $PY -m pytest -q -p no:cacheprovider --maxfail=100 tests
fi
# whatever is left: every case's first GPU shape, then the second, ... (--max-minutes stops starting measurements)
step bench "$OUT/bench.txt" 600 "${ONE[@]}" $BENCH --out "$OUT/bench" "${BENCH_ARGS[@]}" --max-minutes "$(minutes 600)"
BENCH_RC=$?
log "done in $(( $(date +%s) - START ))s; summary:"
cat "$OUT/summary.txt" | tee -a "$LOG"
pack
exit $BENCH_RC
