#!/usr/bin/env bash
# Several nodes with the deepspeed launcher: from one node, it reaches every node of a
# hostfile over passwordless ssh (pdsh by default) and starts one rank per slot on each.
#   HOSTFILE=~/hosts bash launchers/deepspeed_multinode.sh --config configs/FILE.yaml train.max_steps=100000
# HOSTFILE (required; launchers/hostfile.example shows the format, `node1 slots=8`),
# MASTER_ADDR (default: the first host of HOSTFILE), MASTER_PORT (29500),
# DS_LAUNCHER (pdsh; or openmpi, mvapich, slurm, ... as `deepspeed --launcher` takes).
# Run it from a directory all nodes see at the same path (the launcher cd's there on each
# node). It (over)writes ./.deepspeed_env, which the launcher exports on every node: the
# NCCL_* settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, NCCL_IB_DISABLE, ...),
# PYTHONPATH and WANDB_* of this shell, those that are set. The file is private (mode 600)
# as WANDB_API_KEY may be in it.
# Every argument goes to `flowpre train` as it is; the launcher gives each process its
# global RANK and its LOCAL_RANK (and --local_rank, which flowpre takes as LOCAL_RANK).
set -euo pipefail

if [ -z "${HOSTFILE:-}" ]; then
    echo "deepspeed_multinode.sh: set HOSTFILE to your hostfile (format: launchers/hostfile.example)" >&2
    exit 2
fi
if [ ! -f "$HOSTFILE" ]; then
    echo "deepspeed_multinode.sh: HOSTFILE=$HOSTFILE is not a file" >&2
    exit 2
fi
first_host=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
if [ -z "$first_host" ]; then
    echo "deepspeed_multinode.sh: no host in $HOSTFILE (format: launchers/hostfile.example)" >&2
    exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-$first_host}
MASTER_PORT=${MASTER_PORT:-29500}

# KEY=VALUE per line, no blank line (the launcher's parser fails on one).
write_env_file() {
    local name
    for name in $(compgen -e | sort); do
        case "$name" in
            NCCL_*|WANDB_*|PYTHONPATH) ;;
            *) continue ;;
        esac
        if [[ "${!name}" == *$'\n'* ]]; then
            echo "deepspeed_multinode.sh: $name has a newline; not passed to the other nodes" >&2
            continue
        fi
        printf '%s=%s\n' "$name" "${!name}"
    done
}
rm -f .deepspeed_env
(umask 077 && write_env_file >.deepspeed_env)

exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --launcher "${DS_LAUNCHER:-pdsh}" \
    --module flowpre.cli train "$@"
