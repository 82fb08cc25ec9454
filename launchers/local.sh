#!/usr/bin/env bash
# One process, no launcher: flowpre makes a world of one (DeepSpeed included), on the
# first GPU if there is one, else on the CPU.
#   bash launchers/local.sh --config configs/quickstart.yaml train.max_steps=200
# Every argument goes to `flowpre train` as it is.
set -euo pipefail
exec flowpre train "$@"
