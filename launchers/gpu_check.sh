#!/usr/bin/env bash
# One GPU check, under 8 minutes on an H100/H200: kernel correctness on CUDA against the
# PyTorch references (the same tests CI runs through the interpreter), the kernel
# benchmarks, the adaLN backward tiling sweep at DiT-XL width, and a short DiT
# training-throughput run (Triton vs torch kernels).
#   bash launchers/gpu_check.sh [OUT_DIR]
# Environment: FLOWPRE_COMMIT=<sha> stamps the results; TEST_S, BENCH_S, SWEEP_S, TRAIN_S
# cap each stage (seconds; the defaults sum to 470); TESTS, BENCH_FLAGS,
# FLOWPRE_BENCH_ATTN ("N:D,M:N:D,..."), SWEEP_FLAGS and THROUGHPUT_MODELS narrow them
# for a short device lease. Each stage writes its JSON as it goes, so a stage cut off
# by its cap still leaves what it measured.
# Results: OUT_DIR/{gpu_tests.log,kernels.json,adaln_sweep.json,train_throughput.json};
# commit them under benchmarks/results/ with the device named.
# shellcheck disable=SC2086  # TESTS and the *_FLAGS / *_MODELS variables are word lists on purpose
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# flowpre.kernels is kernels/ (setup.py maps it); without an install, a link does the same
if ! python3 -c "import flowpre.kernels" 2>/dev/null; then
    ln -sfn ../kernels flowpre/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check needs a CUDA GPU; nothing measured. Without one, the same kernel tests run through"
    echo "the Triton interpreter in the test suite, and 'python benchmarks/adaln_sweep.py --offline'"
    echo "reports the adaLN kernels' registers and occupancy for sm_90."
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "== 1/4 kernel correctness on CUDA =="
timeout "${TEST_S:-140}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernel_attention.py \
    tests/test_kernel_adaln.py tests/test_kernel_loss.py tests/test_dit_kernels.py} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "== 2/4 kernel benchmarks =="
timeout "${BENCH_S:-160}" python3 -m kernels.bench --out "$OUT/kernels.json" ${BENCH_FLAGS:-} 2>&1 | tee "$OUT/bench.log"
echo "== 3/4 adaLN backward tiling sweep =="
timeout "${SWEEP_S:-80}" python3 benchmarks/adaln_sweep.py --out "$OUT/adaln_sweep.json" \
    ${SWEEP_FLAGS:---widths 1152 --kinds gated --no-compiled} 2>&1 | tee "$OUT/adaln_sweep.log"
echo "== 4/4 training throughput =="
timeout "${TRAIN_S:-90}" python3 benchmarks/train_throughput.py --models ${THROUGHPUT_MODELS:-DiT-B/2,DiT-XL/2} \
    --batch 64 --out "$OUT/train_throughput.json"
