#!/usr/bin/env bash
# One-GPU check of wsss, under 10 minutes: the CUDA tests (pytest -m cuda), then the GPU timings.
#
#   bash benchmarks/gpu_check.sh                 # logs in ./gpu_check_logs
#   OUT=/some/dir bash benchmarks/gpu_check.sh   # logs in $OUT
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#
# Writes: env.txt (GPU, driver, torch), cuda_tests.log, bench_train_cuda.{md,json}, bench_core_cuda.md,
# bench_backbones_cuda.md. Exit status: 0 when the tests and every timing ran, 2 without CUDA,
# otherwise 1. Each step has its own time limit, so a hung step cannot eat the whole budget.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=${OUT:-gpu_check_logs}
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

step() {  # step NAME SECONDS LOGFILE CMD...: run with a time limit, tee the output, remember failures
    local name=$1 limit=$2 logfile=$3
    shift 3
    echo "== $name (limit ${limit}s)" | tee -a "$LOG/summary.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$LOG/$logfile"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

{ nvidia-smi || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"; } \
    > "$LOG/env.txt" 2>&1
cat "$LOG/env.txt"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device: nothing to check" | tee -a "$LOG/summary.txt"
    exit 2
fi

step "cuda tests" 200 cuda_tests.log "$PY" -m pytest -p no:xdist -m cuda tests/test_cuda.py -q -rs
step "bench_train (cuda)" 180 bench_train_cuda.md "$PY" benchmarks/bench_train.py --device cuda \
    --only afa_320 afa_320_bf16 afa_512 afa_pseudo_512 afa_eval_512 --iters 10 --json "$LOG/bench_train_cuda.json"
step "bench_core (cuda)" 60 bench_core_cuda.md "$PY" benchmarks/bench_core.py --device cuda --quick
step "bench_backbones (cuda)" 120 bench_backbones_cuda.md "$PY" benchmarks/bench_backbones.py --device cuda
echo "exit status $status" | tee -a "$LOG/summary.txt"
exit "$status"
