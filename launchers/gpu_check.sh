#!/usr/bin/env bash
# One GPU check, under 8 minutes on an H100/H200: kernel correctness on CUDA against the
# PyTorch references (the same tests CI runs through the interpreter), the real training
# loop (`flowpre train` under DeepSpeed, bf16, ZeRO-2 and ZeRO-3, DiT-XL/2 and DiT-B/2,
# fm and scfm, on synthetic ImageNet-shaped latents), the kernel benchmarks, the adaLN
# backward tiling sweep at DiT-XL width, and a bare DiT step (Triton vs torch kernels).
#   bash launchers/gpu_wheels.sh               # here, once: deepspeed & co. into .whl/
#   bash launchers/gpu_check.sh [OUT_DIR]      # there, with .whl carried along
# Budget (seconds, each stage capped by `timeout`): TEST_S 110 + LOOP_S 170 + BENCH_S 90 +
# SWEEP_S 25 + TRAIN_S 30 + JVP_S 25 = 450, plus ~15 s for the wheel install and start-up: 465 s
# worst case, under 8 minutes (device call: timeout_s=500). A stage cut off by its cap
# still leaves what it measured: each writes its JSON as it goes. The loop stage starts
# with DiT-XL/2 fm at ZeRO-2 (the MFU goal), then scfm (the step-time ratio), then ZeRO-3,
# then DiT-B/2, and records the runs its budget left out.
# Environment: FLOWPRE_COMMIT=<sha> stamps the results; TESTS, LOOP_FLAGS (flags of
# benchmarks/train_loop.py, e.g. "--models DiT-XL/2 --zero 2 --batch 128"), BENCH_FLAGS,
# FLOWPRE_BENCH_ATTN ("N:D,M:N:D,..."), SWEEP_FLAGS and THROUGHPUT_MODELS narrow the stages.
# The loop stage needs deepspeed and webdataset: the GPU machine has no package index, so
# when .whl/ exists its wheels are installed (--no-index --no-deps) into /tmp/site first.
# Results: OUT_DIR/{gpu_tests.log,train_loop.json,train_loop_*.log,kernels.json,
# adaln_sweep.json,train_throughput.json,attention_jvp.json}; commit them under benchmarks/results/ with the
# device named.
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
    echo "the Triton interpreter in the test suite, 'python benchmarks/adaln_sweep.py --offline'"
    echo "reports the adaLN kernels' registers and occupancy for sm_90, and"
    echo "'python benchmarks/train_loop.py --models DiT-2x64x2/2 --size 8 --batch 8' runs the loop stage on CPU."
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site \
        || echo "installing .whl/ failed: the loop stage will say what is missing"
fi
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
LOOP_READY=1
python3 -c "import deepspeed, webdataset, pydantic; print('deepspeed', deepspeed.__version__, 'webdataset', \
webdataset.__version__, 'pydantic', pydantic.VERSION)" 2>&1 | grep -v "^\[" || LOOP_READY=0

echo "== 1/6 kernel correctness on CUDA =="
timeout "${TEST_S:-110}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernel_attention.py \
    tests/test_kernel_adaln.py tests/test_kernel_loss.py tests/test_dit_kernels.py tests/test_forward_mode.py \
    tests/test_kernel_attention_jvp.py} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "== 2/6 the training loop: flowpre train, DeepSpeed, bf16, ZeRO-2/3, synthetic ImageNet latents =="
if [ "$LOOP_READY" = 1 ]; then
    # --budget leaves the script time to stop its last run and write; timeout is the backstop
    timeout "${LOOP_S:-170}" python3 benchmarks/train_loop.py --out "$OUT/train_loop.json" \
        --budget $(( ${LOOP_S:-170} - 8 )) ${LOOP_FLAGS:-} 2>&1 | grep -v "^\[.*real_accelerator" | tee "$OUT/train_loop.log"
else
    echo "skipped: deepspeed, webdataset or pydantic does not import (run launchers/gpu_wheels.sh here and carry .whl)"
fi
echo "== 3/6 kernel benchmarks =="
timeout "${BENCH_S:-90}" python3 -m kernels.bench --out "$OUT/kernels.json" ${BENCH_FLAGS:-} 2>&1 | tee "$OUT/bench.log"
echo "== 4/6 adaLN backward tiling sweep =="
timeout "${SWEEP_S:-25}" python3 benchmarks/adaln_sweep.py --out "$OUT/adaln_sweep.json" \
    ${SWEEP_FLAGS:---widths 1152 --kinds gated --no-compiled} 2>&1 | tee "$OUT/adaln_sweep.log"
echo "== 5/6 bare DiT step (no DeepSpeed, EMA or data) =="
timeout "${TRAIN_S:-30}" python3 benchmarks/train_throughput.py --models ${THROUGHPUT_MODELS:-DiT-XL/2} \
    --batch 64 --out "$OUT/train_throughput.json"
echo "== 6/6 forward-mode attention: the fused JVP kernel against torch.func.jvp on the math path =="
timeout "${JVP_S:-25}" python3 benchmarks/attention_jvp.py --quick --out "$OUT/attention_jvp.json" 2>&1 | tee "$OUT/attention_jvp.log"
