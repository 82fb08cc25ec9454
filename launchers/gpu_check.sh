#!/usr/bin/env bash
# One GPU check, under 8 minutes on an H100/H200: kernel correctness on CUDA against the
# PyTorch references (the same tests CI runs through the interpreter), the kernel
# benchmarks, and a short DiT training-throughput run (Triton vs torch kernels).
#   bash launchers/gpu_check.sh [OUT_DIR]
# Environment: FLOWPRE_COMMIT=<sha> stamps the results; TEST_S, BENCH_S, TRAIN_S cap each
# stage (seconds); TESTS, BENCH_FLAGS, FLOWPRE_BENCH_ATTN ("N:D,M:N:D,...") and
# THROUGHPUT_MODELS narrow them for a short device lease.
# Results: OUT_DIR/{gpu_tests.log,kernels.json,train_throughput.json}; commit them under
# benchmarks/results/ with the device named.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# flowpre.kernels is kernels/ (setup.py maps it); without an install, a link does the same
if ! python3 -c "import flowpre.kernels" 2>/dev/null; then
    ln -sfn ../kernels flowpre/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "== 1/3 kernel correctness on CUDA =="
timeout "${TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernel_attention.py \
    tests/test_kernel_adaln.py tests/test_kernel_loss.py tests/test_dit_kernels.py} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "== 2/3 kernel benchmarks =="
timeout "${BENCH_S:-200}" python3 -m kernels.bench --out "$OUT/kernels.json" ${BENCH_FLAGS:-} 2>&1 | tee "$OUT/bench.log"
echo "== 3/3 training throughput =="
timeout "${TRAIN_S:-120}" python3 benchmarks/train_throughput.py --models ${THROUGHPUT_MODELS:-DiT-B/2,DiT-XL/2} \
    --batch 64 --out "$OUT/train_throughput.json"
