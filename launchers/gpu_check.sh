#!/usr/bin/env bash
# One GPU check, under 8 minutes on an H100/H200: kernel correctness on CUDA against the
# PyTorch references (the same tests CI runs through the interpreter), the real training
# loop (`flowpre train` under DeepSpeed, bf16, ZeRO-2 and ZeRO-3, DiT-XL/2 and DiT-B/2,
# fm and scfm, on synthetic ImageNet-shaped latents), the kernel benchmarks, the adaLN
# backward tiling sweep at DiT-XL width, a bare DiT step (Triton vs torch kernels) and the
# fused attention JVP against torch.func.jvp.
#   bash launchers/gpu_wheels.sh                  # here, once: deepspeed & co. into .whl/
#   bash launchers/gpu_check.sh OUT_DIR           # there, with .whl carried along
#   bash launchers/gpu_check.sh --rehearse OUT    # here: every stage's code on the CPU, tiny
# Results: the GPU machine returns at most 8 files, so every stage writes into a staging
# folder and, after each stage, all of it is packed into OUT_DIR/gpu_check.tar.gz next to
# OUT_DIR/summary.json (device, commit, each stage's status and headline figures, the GPU
# goals; benchmarks/gpu_check_summary.py). Two files, rewritten stage by stage, so a check
# cut off by its lease returns every stage that finished (after a SIGTERM, the stage in
# flight too). Unpack and commit them under benchmarks/results/ with the device named
# (README, "Kernels").
# --rehearse runs each stage's Python code on the CPU at the smallest shapes (kernels
# through the Triton interpreter, a 2-step loop run at DiT-2x64x2/2, one shape per kernel,
# one tiling in the sweep, one JVP shape) and writes the same two files, marked as a
# rehearsal: tests/test_gpu_check.py runs it in CI, so a broken stage shows before GPU day.
# Budget (seconds, each stage capped by `timeout`): TEST_S 110 + LOOP_S 170 + BENCH_S 90 +
# SWEEP_S 25 + TRAIN_S 30 + JVP_S 25 = 450, plus ~15 s for the wheel install, start-up and
# packing: 465 s worst case, under 8 minutes (device call: timeout_s=500). A stage cut off
# by its cap still leaves what it measured: each writes its JSON as it goes. The loop stage
# starts with DiT-XL/2 fm at ZeRO-2 (the MFU goal), then scfm (the step-time ratio), then
# ZeRO-3, then DiT-B/2, and records the runs its budget left out.
# Environment: FLOWPRE_COMMIT=<sha> stamps the results (the device's copy may have no .git);
# TESTS, LOOP_FLAGS (flags of benchmarks/train_loop.py, e.g. "--models DiT-XL/2 --zero 2
# --batch 128"), BENCH_FLAGS, FLOWPRE_BENCH_ATTN ("N:D,M:N:D,..."), SWEEP_FLAGS and
# THROUGHPUT_MODELS narrow the stages.
# The loop stage needs deepspeed, webdataset and pydantic: the GPU machine has no package
# index, so when .whl/ exists its wheels are installed (--no-index --no-deps) into /tmp/site
# first. Everything else a stage imports is in the GPU image (launchers/gpu_wheels.sh).
# shellcheck disable=SC2086  # TESTS and the *_FLAGS / *_MODELS variables are word lists on purpose
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then
    REHEARSE=1
    shift
fi
OUT=${1:-${OUT:-}}
if [ -z "$OUT" ]; then
    echo "usage: bash launchers/gpu_check.sh [--rehearse] OUT_DIR (or set OUT)" >&2
    exit 2
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
# without an install, flowpre comes from this checkout
if ! python3 -c "import flowpre.kernels" 2>/dev/null; then
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$REHEARSE" = 1 ]; then
    # the CPU even on a GPU machine: the rehearsal checks code paths, it measures nothing
    export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    INTERPRET=(env TRITON_INTERPRET=1)
    REHEARSE_FLAG=--rehearse
    SUMMARY_FLAGS=--rehearsal
    CAP=240  # CPU stages on a loaded CI machine: generous caps, the GPU's do not apply
    echo "rehearsal on the CPU: every stage's code at the smallest shapes; nothing is measured"
else
    if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check needs a CUDA GPU; nothing measured. Without one, 'bash launchers/gpu_check.sh --rehearse OUT'"
        echo "runs every stage on the CPU at the smallest shapes; the kernel tests run through the Triton interpreter in"
        echo "the test suite, 'python benchmarks/adaln_sweep.py --offline' reports the adaLN kernels' registers and"
        echo "occupancy for sm_90, and 'python benchmarks/train_loop.py --models DiT-2x64x2/2 --size 8 --batch 8' runs the"
        echo "loop stage on the CPU."
        exit 0
    fi
    INTERPRET=()
    REHEARSE_FLAG=""
    SUMMARY_FLAGS=""
    CAP=""
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}/tmp/site \
            || echo "installing .whl/ failed: the loop stage will say what is missing"
    fi
fi
TEST_S=${TEST_S:-${CAP:-110}} LOOP_S=${LOOP_S:-${CAP:-170}} BENCH_S=${BENCH_S:-${CAP:-90}}
SWEEP_S=${SWEEP_S:-${CAP:-25}} TRAIN_S=${TRAIN_S:-${CAP:-30}} JVP_S=${JVP_S:-${CAP:-25}}
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # packed after every stage
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")  # the loop's shards and runs: not packed
trap 'rm -rf "$STAGE" "$WORK"' EXIT

# device, commit and versions; exits 3 when the loop stage's packages do not import
python3 - "$STAGE/env.json" <<'EOF'
import json, os, platform, subprocess, sys
env = {"python": platform.python_version()}
import torch
env["torch"] = torch.__version__
env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (rehearsal)"
commit = os.environ.get("FLOWPRE_COMMIT")
if not commit:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        commit = (commit + "+uncommitted changes") if commit and dirty else commit
    except OSError:
        pass
env["commit"] = commit or "unknown (set FLOWPRE_COMMIT)"
if torch.cuda.is_available():
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                            "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
missing = []
for name in ("triton", "deepspeed", "webdataset", "pydantic"):
    try:
        module = __import__(name)
        env[name] = getattr(module, "__version__", None) or str(getattr(module, "VERSION", "?"))
    except Exception as e:  # noqa: BLE001 - a broken install is reported, not raised
        env[name] = f"missing: {type(e).__name__}: {e}"[:200]
        missing += [name] if name != "triton" else []
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(" ".join(f"{k} {v}" for k, v in env.items() if k != "nvidia_smi"))
sys.exit(3 if missing else 0)
EOF
ENV_RC=$?
LOOP_READY=$([ "$ENV_RC" = 0 ] && echo 1 || echo 0)

pack() {  # the summary, then everything staged into one archive, replaced whole
    python3 benchmarks/gpu_check_summary.py "$STAGE" "$STAGE/summary.json" $SUMMARY_FLAGS \
        || echo '{"error": "benchmarks/gpu_check_summary.py failed: read gpu_check.tar.gz"}' >"$STAGE/summary.json"
    tar -czf "$OUT/gpu_check.tar.gz.part" -C "$STAGE" . && mv -f "$OUT/gpu_check.tar.gz.part" "$OUT/gpu_check.tar.gz"
    cp "$STAGE/summary.json" "$OUT/summary.json"
    if [ "$(stat -c %s "$OUT/gpu_check.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
        echo "WARNING: gpu_check.tar.gz is over 15 MiB; the device returns files of at most 16 MiB"
    fi
}
begin() {  # NAME CAP TITLE: the stage in flight, for record and for a signal
    CURRENT=$1 CURRENT_CAP=$2 t=$SECONDS
    echo "== $3 =="
}
record() {  # NAME RC START CAP: one line of stages.tsv (name, rc, wall s, cap s), then pack
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$((SECONDS - $3))" "$4" >>"$STAGE/stages.tsv"
    CURRENT=""
    pack
}
# Stopped from outside (SIGTERM, e.g. a lease ending): bash runs this once the stage in
# flight has ended (its processes lose their output pipe with the script), then packs what
# that stage wrote too.
CURRENT=""
trap 'echo "stopped: packing what the stages wrote"; [ -z "$CURRENT" ] || record "$CURRENT" "stopped: the check was signalled" "$t" "$CURRENT_CAP"; exit 143' TERM INT

if [ "$REHEARSE" = 1 ]; then
    # one quick test per kernel file: collecting all six imports every kernel module
    TEST_ARGS=(tests/test_kernel_attention.py tests/test_kernel_adaln.py tests/test_kernel_loss.py
               tests/test_dit_kernels.py tests/test_forward_mode.py tests/test_kernel_attention_jvp.py
               -k "bad_inputs or (gradcheck and not adaln) or opcheck")
    LOOP_DEFAULT="--models DiT-2x64x2/2 --size 8 --count 64 --batch 8 --workers 1 --steps 2 --log-every 1
                  --zero 2,3 --objectives scfm --min-run-s 5"
    THROUGHPUT_ARGS="--models ${THROUGHPUT_MODELS:-DiT-2x64x2/2} --batch 2 --size 8"
else
    TEST_ARGS=(tests/test_kernel_attention.py tests/test_kernel_adaln.py tests/test_kernel_loss.py
               tests/test_dit_kernels.py tests/test_forward_mode.py tests/test_kernel_attention_jvp.py)
    LOOP_DEFAULT=""
    THROUGHPUT_ARGS="--models ${THROUGHPUT_MODELS:-DiT-XL/2} --batch 64"
fi
[ -n "${TESTS:-}" ] && read -r -a TEST_ARGS <<<"$TESTS"

begin tests "$TEST_S" "1/6 kernel correctness"
timeout "$TEST_S" python3 -m pytest -q -p no:cacheprovider "${TEST_ARGS[@]}" 2>&1 | tee "$STAGE/gpu_tests.log" | tail -15
record tests "${PIPESTATUS[0]}" $t "$TEST_S"

begin train_loop "$LOOP_S" "2/6 the training loop: flowpre train, DeepSpeed, bf16, ZeRO-2/3, synthetic ImageNet latents"
if [ "$LOOP_READY" = 1 ]; then
    # --budget leaves the script time to stop its last run and write; timeout is the backstop
    timeout "$LOOP_S" python3 benchmarks/train_loop.py --out "$STAGE/train_loop.json" --work "$WORK" \
        --budget $((LOOP_S - 8)) ${LOOP_FLAGS:-$LOOP_DEFAULT} 2>&1 | grep -v "^\[.*real_accelerator" \
        | tee "$STAGE/train_loop.log"
    record train_loop "${PIPESTATUS[0]}" $t "$LOOP_S"
else
    echo "skipped: deepspeed, webdataset or pydantic does not import (run launchers/gpu_wheels.sh here and carry .whl)"
    record train_loop "skipped: deepspeed, webdataset or pydantic does not import (env.json)" $t "$LOOP_S"
fi

begin kernels "$BENCH_S" "3/6 kernel benchmarks"
timeout "$BENCH_S" "${INTERPRET[@]}" python3 -m flowpre.kernels.bench --out "$STAGE/kernels.json" $REHEARSE_FLAG \
    ${BENCH_FLAGS:-} 2>&1 | tee "$STAGE/bench.log"
record kernels "${PIPESTATUS[0]}" $t "$BENCH_S"

begin adaln_sweep "$SWEEP_S" "4/6 adaLN backward tiling sweep"
timeout "$SWEEP_S" "${INTERPRET[@]}" python3 benchmarks/adaln_sweep.py --out "$STAGE/adaln_sweep.json" $REHEARSE_FLAG \
    ${SWEEP_FLAGS:---widths 1152 --kinds gated --no-compiled} 2>&1 | tee "$STAGE/adaln_sweep.log"
record adaln_sweep "${PIPESTATUS[0]}" $t "$SWEEP_S"

begin train_throughput "$TRAIN_S" "5/6 bare DiT step (no DeepSpeed, EMA or data)"
timeout "$TRAIN_S" "${INTERPRET[@]}" python3 benchmarks/train_throughput.py $THROUGHPUT_ARGS $REHEARSE_FLAG \
    --out "$STAGE/train_throughput.json" 2>&1 | tee "$STAGE/train_throughput.log"
record train_throughput "${PIPESTATUS[0]}" $t "$TRAIN_S"

# without CUDA (the rehearsal) the script runs its one-shape interpreter smoke check
begin attention_jvp "$JVP_S" "6/6 forward-mode attention: the fused JVP kernel against torch.func.jvp on the math path"
timeout "$JVP_S" python3 benchmarks/attention_jvp.py --quick --out "$STAGE/attention_jvp.json" 2>&1 \
    | tee "$STAGE/attention_jvp.log"
record attention_jvp "${PIPESTATUS[0]}" $t "$JVP_S"

python3 -c "import json, sys; s = json.load(open(sys.argv[1])); print('summary:', 'all stages ok' if s.get('all_ok') else
    {k: v['status'] for k, v in s.get('stages', {}).items() if v['status'] != 'ok'})" "$OUT/summary.json"
echo "wrote $OUT/gpu_check.tar.gz and $OUT/summary.json"
