#!/usr/bin/env bash
# The prepared GPU check (one H100, <= 8 minutes, nothing installed): runs each stage of
# benchmarks/gpu_check.py in its own process under its own `timeout`, then writes one JSON and a
# markdown table under benchmarks/results/gpu/ (gpu_check.* on a GPU, gpu_check_dry.* in dry mode),
# even when stages fail or time out. The JSON is also the last stdout line.
#
#     bash benchmarks/gpu_check.sh          # GPU run (dry run automatically when torch sees no CUDA)
#     bash benchmarks/gpu_check.sh --dry    # force the CPU dry run (tiny shapes, CUDA-only parts skipped)
#
# Stage budgets (seconds) come from `gpu_check.py --list-stages` (STAGES there; the estimates are
# in its docstring): env 15, pytest_gpu 80, kernels_vs_naive 55, kernels_tflops 55, engine 220 =
# 425 s, + <= 5 s kill grace each and <= 30 s for the report: <= 480 s.
# If $OUT is set (the device runner's output folder), the results and stage logs are copied there.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DRY=""
if [ "${1:-}" = "--dry" ]; then
    DRY=--dry
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: torch sees no CUDA device: DRY RUN (tiny shapes on the CPU; CUDA-only parts are skipped)" >&2
    DRY=--dry
fi
NPROC=$(nproc 2>/dev/null || echo 8)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( NPROC < 8 ? NPROC : 8 ))} TOKENIZERS_PARALLELISM=false
unset DSA_KERNEL_BACKEND  # each stage picks its backend
[ -z "$DRY" ] && unset TRITON_INTERPRET  # compiled kernels on the GPU (the dry run sets it per stage)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
T0=$(date +%s)
while read -r name budget; do
    s=$(date +%s)
    timeout -k 5 "$budget" "$PY" benchmarks/gpu_check.py --stage "$name" --dir "$WORK" $DRY </dev/null >"$WORK/$name.log" 2>&1
    rc=$?
    echo "$rc $(( $(date +%s) - s ))" >"$WORK/$name.rc"
    echo "gpu_check: stage $name exit $rc after $(( $(date +%s) - s )) s (budget $budget s)" >&2
done < <("$PY" benchmarks/gpu_check.py --list-stages)
timeout -k 5 30 "$PY" benchmarks/gpu_check.py --report --dir "$WORK" --total-wall "$(( $(date +%s) - T0 ))" $DRY
rc=$?
echo "gpu_check: stage records and logs in $WORK" >&2
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    mkdir -p "$OUT/gpu_check" && cp -r benchmarks/results/gpu/. "$OUT/gpu_check/" && cp "$WORK"/*.log "$OUT/gpu_check/" 2>/dev/null
fi
exit $rc
