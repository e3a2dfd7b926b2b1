#!/usr/bin/env bash
# One prepared GPU session: check the GPU, install peers from local wheels, run the tests, `fusedpg verify` and
# the benchmark suite (every case: linear, logits, pg, attention, model), and leave every log and result in OUTDIR.
# Sized for under 8 minutes on one H100: the bench step stops starting measurements after FUSEDPG_BENCH_MINUTES
# (--max-minutes); its order is rank-major (every case's first GPU shape, then every case's second, ...) with the
# impls that compile (torch.compile, compiled Liger, FlexAttention) after all others, so a spent budget cuts extra
# sweep points and compilations, never a whole case.
#
#   bash bench/device.sh OUTDIR [--wheels DIR] [--dry-run]
#
#   --wheels DIR  pip-install the pure-Python peers (liger-kernel, cut-cross-entropy) from DIR with --no-index
#                 --no-deps: nothing is downloaded and torch/triton are left as they are.
#   --dry-run     exercise the script on CPU (no GPU check, no test run, the tiniest shape of every case), for CI.
#
# OUTDIR gets: device.log (all output), summary.txt (exit code of each step), nvidia-smi.txt, pip-freeze.txt,
# floor-linear/ and floor-pg/ (the memory-floor runs, first), parity.txt, verify.txt, pytest.txt, bench/ (results.json, results.csv, rows.jsonl, table.md, plots).
# Time limits per step can be changed with FUSEDPG_TEST_TIMEOUT, FUSEDPG_VERIFY_TIMEOUT, FUSEDPG_BENCH_MINUTES.
set -uo pipefail

usage() { echo "usage: bash bench/device.sh OUTDIR [--wheels DIR] [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
WHEELS=""; DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || usage; WHEELS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) usage ;;
  esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python}
TEST_TIMEOUT=${FUSEDPG_TEST_TIMEOUT:-120}
VERIFY_TIMEOUT=${FUSEDPG_VERIFY_TIMEOUT:-60}
BENCH_MINUTES=${FUSEDPG_BENCH_MINUTES:-3.5}
LOG="$OUT/device.log"
: > "$LOG"; : > "$OUT/summary.txt"
START=$(date +%s)

log() { echo "[device.sh $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
# step NAME FILE CMD...: run CMD, output to FILE and the log, record its exit code in summary.txt.
step() {
  local name=$1 file=$2; shift 2
  log "$name: $*"
  "$@" > "$file" 2>&1
  local rc=$?
  cat "$file" >> "$LOG"
  echo "$name rc=$rc ($(( $(date +%s) - START ))s)" >> "$OUT/summary.txt"
  log "$name: rc=$rc"
  return $rc
}

log "repo $(pwd), commit $(git rev-parse HEAD 2>/dev/null || echo unknown), out $OUT, dry-run=$DRY"
if [ "$DRY" = 1 ]; then
  log "dry run: GPU check skipped"
  echo "dry run: no GPU check" > "$OUT/nvidia-smi.txt"
else
  step nvidia-smi "$OUT/nvidia-smi.txt" nvidia-smi || log "nvidia-smi failed (continuing to the torch check)"
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    log "torch.cuda.is_available() is False: no GPU for this run"; echo "gpu-check rc=1" >> "$OUT/summary.txt"; exit 2
  fi
  $PY -c "import torch; p = torch.cuda.get_device_properties(0); print('gpu', p.name, p.total_memory >> 30, 'GiB')" \
    | tee -a "$LOG"
fi

# The working tree may arrive without the package installed; an editable install needs no download.
if ! $PY -c "import fusedpg.bench" 2>/dev/null; then
  step install "$OUT/install.txt" $PY -m pip install --no-deps --no-index --no-build-isolation -e . || exit 2
fi

if [ -n "$WHEELS" ]; then
  for peer in liger-kernel cut-cross-entropy; do
    if [ "$DRY" = 1 ]; then
      log "dry run: would run: $PY -m pip install --no-index --no-deps --find-links $WHEELS $peer"
    else
      step "wheel-$peer" "$OUT/pip-$peer.txt" $PY -m pip install --no-index --no-deps --find-links "$WHEELS" "$peer" \
        || log "peer $peer not installed: its rows will say missing"
    fi
  done
fi
$PY -m pip freeze 2>/dev/null | grep -i -E 'torch|triton|fusedpg|liger|cut.cross|transformers|numpy|matplotlib|tqdm' \
  > "$OUT/pip-freeze.txt" || true
log "pip freeze (subset): $(tr '\n' ' ' < "$OUT/pip-freeze.txt")"

# Issue 12's targets first, so that a short slot yields them before anything else: extra peak memory of ours and
# ours-low against the bytes of d_weight, with Liger, CCE, eager and the three-GEMM floor beside them, at
# 8192x4096x151936 bf16 (the dry run: the same commands at a tiny shape on CPU).
if [ "$DRY" = 1 ]; then FLOOR=16x8x32; FDEV=cpu; FLOOR_MIN=0.5; else FLOOR=8192x4096x151936; FDEV=cuda; FLOOR_MIN=2; fi
step floor-linear "$OUT/floor-linear.txt" timeout 300 $PY -m fusedpg.cli bench --out "$OUT/floor-linear" \
  --device "$FDEV" --case linear --shape "$FLOOR" --impl ours,ours-low,floor,cce,liger,eager --dtype bf16 \
  --mode fwd+bwd --reps 3 --max-minutes "$FLOOR_MIN" --no-progress --no-plots
step floor-pg "$OUT/floor-pg.txt" timeout 300 $PY -m fusedpg.cli bench --out "$OUT/floor-pg" \
  --device "$FDEV" --case pg --shape "$FLOOR:dapo" --impl ours,ours-low,floor,liger,eager --dtype bf16 \
  --mode fwd+bwd --reps 3 --max-minutes "$FLOOR_MIN" --no-progress --no-plots

if [ "$DRY" = 1 ]; then
  # One thread: tiny shapes on a loaded machine otherwise wait for time slices between threads.
  step verify "$OUT/verify.txt" timeout "$VERIFY_TIMEOUT" env OMP_NUM_THREADS=1 $PY -m fusedpg.cli verify \
    --device cpu --dtype fp32 --only primitives
  # The tests are what runs this script in dry-run mode: running them here would recurse.
  echo "dry run: tests not run" > "$OUT/pytest.txt"
  step bench "$OUT/bench.txt" timeout 240 env OMP_NUM_THREADS=1 $PY -m fusedpg.cli bench --out "$OUT/bench" \
    --device cpu --quick --shape 16x8x32 --shape 4+2x2 --reps 1 --warmup 0 --max-minutes "$BENCH_MINUTES" \
    --no-progress
else
  # one host read per fused-loss call (sync debug mode), bitwise batch invariance and the in-GEMM d_weight on CUDA
  step parity "$OUT/parity.txt" timeout 180 $PY -m pytest -q tests/test_host_sync.py tests/test_deterministic.py \
    tests/test_accumulate_mm.py tests/test_otr.py tests/test_truncation.py tests/test_kernel_compile.py
  # issue 11's cost ratios: deterministic vs default, truncated (Triton chunk logits) vs untruncated
  step parity-cost "$OUT/parity-cost.txt" timeout 240 $PY -m fusedpg.cli bench --out "$OUT/parity-cost" \
    --device cuda --case linear,logits,sampler --shape 4096x4096x151936 --impl ours,ours-det,untruncated \
    --dtype bf16 --mode fwd+bwd --reps 5 --max-minutes 3 --no-progress --no-plots
  step verify "$OUT/verify.txt" timeout "$VERIFY_TIMEOUT" $PY -m fusedpg.cli verify --device cuda
  # no -x: a test that assumes a CPU-only machine must not hide the rest of the GPU run's results
  step pytest "$OUT/pytest.txt" timeout "$TEST_TIMEOUT" $PY -m pytest -q -p no:cacheprovider --maxfail=100 tests
  # --max-minutes stops starting measurements; the timeout only catches a hang (rows.jsonl keeps what ran).
  BENCH_TIMEOUT=$($PY -c "print(int(60 * $BENCH_MINUTES + 60))")
  step bench "$OUT/bench.txt" timeout "$BENCH_TIMEOUT" $PY -m fusedpg.cli bench --out "$OUT/bench" --device cuda \
    --max-minutes "$BENCH_MINUTES"
fi
BENCH_RC=$?
log "done in $(( $(date +%s) - START ))s; summary:"
cat "$OUT/summary.txt" | tee -a "$LOG"
exit $BENCH_RC
