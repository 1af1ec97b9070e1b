#!/usr/bin/env bash
# The GPU path's checks in one run (issue 14), on a machine with an NVIDIA GPU and the repo set up
# (`pip install -e '.[test,gpu]'`, or `make setup` then `.venv/bin/pip install triton`):
#
#   1. the parity tests with the Triton modes on cuda (compiled kernels, not the interpreter):
#      the MLA decode kernel, the fused MoE, the FP8 GEMM (where those test files exist), devices;
#   2. benchmarks/kernels.py --kernel all: each kernel against the device's copy bandwidth;
#   3. benchmarks/offline.py --device cuda: the `small` bench model, ours against HF on the GPU.
#
# Writes pytest-*.xml, kernels.json, offline.json and a summary.json to $OUT (default: a new
# temporary directory, printed). Exits non-zero when a step failed; the other steps still run.
#
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-$(mktemp -d -t dsray-gpu-check.XXXXXX)}
mkdir -p "$OUT"
unset TRITON_INTERPRET  # compiled kernels: the point of this script
export PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch, triton; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: needs torch with a visible CUDA device and triton (pip install -e '.[gpu]')" >&2
    exit 2
fi
"$PY" -c 'import torch, triton; print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")'

declare -A status
run() {  # run NAME TIMEOUT_S CMD...: one step, its rc kept in status[NAME]
    local name=$1 limit=$2
    shift 2
    echo "gpu_check: == $name: $*"
    timeout "$limit" "$@"
    status[$name]=$?
    echo "gpu_check: == $name: rc ${status[$name]}"
}

# 1. Each test file in a process of its own: a module that sets TRITON_INTERPRET for CPU runs
#    cannot leak into the others.
for test in tests/attention/test_triton_mla.py tests/experts/test_triton_moe.py tests/experts/test_fp8_slots.py \
    tests/dsray/test_device.py \
    tests/model/test_fp8*.py tests/dsray/test_fp8*.py; do
    [ -f "$test" ] || continue
    name=pytest-$(basename "$test" .py)
    run "$name" 300 "$PY" -m pytest -q -x -p no:cacheprovider "$test" --junitxml "$OUT/$name.xml"
done

# 2. The kernels alone.
run kernels 300 "$PY" benchmarks/kernels.py --kernel all --out "$OUT/kernels.json"

# 3. The engine on the GPU against HF on the GPU (the `small` model is made once, offline).
run offline 600 "$PY" benchmarks/offline.py --device cuda --repeats 2 --num-prompts 32 --out "$OUT/offline.json"

failed=0
summary="{"
for name in "${!status[@]}"; do
    summary+="\"$name\": ${status[$name]}, "
    [ "${status[$name]}" -eq 0 ] || failed=1
done
summary="${summary%, }}"
echo "$summary" >"$OUT/summary.json"
echo "gpu_check: return codes $summary; files in $OUT"
exit $failed
