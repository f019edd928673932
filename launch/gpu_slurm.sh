#!/usr/bin/env bash
# Multi-node GPU runs of infd_jax. `submit` writes an sbatch script that starts
# one process per node (each drives all GPUs of its node) and submits it;
# `local` starts N CPU processes on this machine to try the multi-process path.
# The processes find each other through the INFD_* variables that
# infd_jax.main hands to jax.distributed.initialize().
set -euo pipefail

readonly PROG="launch/gpu_slurm.sh"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh SUBCOMMAND [FLAGS] [-- EXTRA ARGS FOR infd_jax.main]

Subcommands:
  submit   Write an sbatch script (one process per node) and submit it.
  local    Start N processes on 127.0.0.1 with CPU devices and wait for them;
           a small stand-in for a multi-node run.

Flags (each may also come from the environment variable in brackets):
  --config=PATH           Config file, relative to the repo [INFD_CONFIG] (required)
  --workdir=DIR           Output dir, shared by all nodes [INFD_WORKDIR] (required)
  --python=PYTHON         Interpreter with infd_jax's requirements [INFD_PYTHON]
                          (default: python3)
  --log-dir=DIR           Where logs (and the sbatch script) go [INFD_LOG_DIR]
                          (default: <repo>/logs/slurm or <repo>/logs/local)
  --env=KEY=VALUE         Extra environment for the processes (repeatable)
  --port=PORT             Coordinator port [INFD_COORDINATOR_PORT] (default:
                          from the job id for submit, 12355 for local)
 submit:
  --nodes=N               Number of nodes [INFD_NODES] (required)
  --gpus-per-node=G       GPUs per node [INFD_GPUS_PER_NODE] (default: 8)
  --partition=NAME        SLURM partition [INFD_PARTITION] (default: cluster's)
  --time=D-HH:MM:SS       Time limit [INFD_TIME] (default: partition's)
  --job-name=NAME         Job name [INFD_JOB_NAME] (default: infd)
  --no-exclusive          Share nodes with other jobs (default: whole nodes)
  --setup=LINE            Shell line run before the processes start, e.g.
                          "module load cuda/12.4" [INFD_SETUP]
  --sbatch-arg=ARG        Extra #SBATCH option, e.g. --account=abc (repeatable)
 local:
  --num-processes=N       Processes to start [INFD_LOCAL_PROCESSES] (default: 2)
  --devices-per-process=D Fake CPU devices per process [INFD_LOCAL_DEVICES]
                          (default: 4)
  --dry-run               Print the script and every command instead of
                          running them [DRY_RUN=1]
  -h, --help              Show this help.

Example:
  launch/gpu_slurm.sh submit --nodes=4 --partition=h100 --time=2-00:00:00 \
      --python=/shared/venvs/infd/bin/python \
      --config=configs/ffhq.py --workdir=/shared/runs/ffhq -- \
      --config.train.batch_size=64
  launch/gpu_slurm.sh local --config=configs/tiny.py --workdir=/tmp/infd_tiny
EOF
}

# --- Parameters: environment first, flags override. ---
INFD_CONFIG="${INFD_CONFIG:-}"
INFD_WORKDIR="${INFD_WORKDIR:-}"
INFD_PYTHON="${INFD_PYTHON:-python3}"
INFD_LOG_DIR="${INFD_LOG_DIR:-}"
INFD_COORDINATOR_PORT="${INFD_COORDINATOR_PORT:-}"
INFD_NODES="${INFD_NODES:-}"
INFD_GPUS_PER_NODE="${INFD_GPUS_PER_NODE:-8}"
INFD_PARTITION="${INFD_PARTITION:-}"
INFD_TIME="${INFD_TIME:-}"
INFD_JOB_NAME="${INFD_JOB_NAME:-infd}"
INFD_SETUP="${INFD_SETUP:-}"
INFD_LOCAL_PROCESSES="${INFD_LOCAL_PROCESSES:-2}"
INFD_LOCAL_DEVICES="${INFD_LOCAL_DEVICES:-4}"
DRY_RUN="${DRY_RUN:-0}"
EXCLUSIVE=1
RUN_ENV=()
SBATCH_ARGS=()
EXTRA_ARGS=()
SUBCOMMAND=""

set_flag() {
  case "$1" in
    --config) INFD_CONFIG=$2 ;;
    --workdir) INFD_WORKDIR=$2 ;;
    --python) INFD_PYTHON=$2 ;;
    --log-dir) INFD_LOG_DIR=$2 ;;
    --port) INFD_COORDINATOR_PORT=$2 ;;
    --nodes) INFD_NODES=$2 ;;
    --gpus-per-node) INFD_GPUS_PER_NODE=$2 ;;
    --partition) INFD_PARTITION=$2 ;;
    --time) INFD_TIME=$2 ;;
    --job-name) INFD_JOB_NAME=$2 ;;
    --setup) INFD_SETUP=$2 ;;
    --sbatch-arg) SBATCH_ARGS+=("$2") ;;
    --num-processes) INFD_LOCAL_PROCESSES=$2 ;;
    --devices-per-process) INFD_LOCAL_DEVICES=$2 ;;
    --env) add_env "$2" ;;
    *) die "unknown flag: $1" ;;
  esac
}

set_switch() {
  case "$1" in
    --no-exclusive) EXCLUSIVE=0 ;;
    *) return 1 ;;
  esac
}

parse_args "submit local" "$@"
require INFD_CONFIG --config INFD_CONFIG
require INFD_WORKDIR --workdir INFD_WORKDIR
[[ -z ${INFD_COORDINATOR_PORT} ]] || require_int INFD_COORDINATOR_PORT --port

MAIN=("${INFD_PYTHON}" -m infd_jax.main
  "--config=${INFD_CONFIG}" "--workdir=${INFD_WORKDIR}" "${EXTRA_ARGS[@]}")

# Prints the sbatch script on stdout.
sbatch_script() {
  local log_dir=$1 gpu_ids port
  # 0,1,...,G-1: see JAX_LOCAL_DEVICE_IDS below.
  gpu_ids="$(seq -s, 0 $((INFD_GPUS_PER_NODE - 1)))"
  # Same rule as jax's SLURM detection: a port from the job id, so that two
  # jobs that share a first node do not collide.
  port="${INFD_COORDINATOR_PORT:-\$((SLURM_JOB_ID % 4096 + 61440))}"

  echo "#!/bin/bash"
  echo "#SBATCH --job-name=${INFD_JOB_NAME}"
  echo "#SBATCH --nodes=${INFD_NODES}"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=${INFD_GPUS_PER_NODE}"
  [[ -z ${INFD_PARTITION} ]] || echo "#SBATCH --partition=${INFD_PARTITION}"
  [[ -z ${INFD_TIME} ]] || echo "#SBATCH --time=${INFD_TIME}"
  [[ ${EXCLUSIVE} != 1 ]] || echo "#SBATCH --exclusive"
  echo "#SBATCH --output=${log_dir}/%x-%j.out"
  local arg
  for arg in "${SBATCH_ARGS[@]}"; do echo "#SBATCH ${arg}"; done
  cat <<EOF
# Generated by ${PROG}.
set -euo pipefail
${INFD_SETUP}
EOF
  for arg in "${RUN_ENV[@]}"; do echo "export $(quote "${arg}")"; done
  cat <<EOF

# jax's coordinator lives in process 0, which srun puts on the first node.
nodes="\$(scontrol show hostnames "\${SLURM_JOB_NODELIST}")"
export INFD_COORDINATOR_ADDRESS="\${nodes%%[[:space:]]*}:${port}"
export INFD_NUM_PROCESSES="\${SLURM_NNODES}"
# Each process drives every GPU of its node. Naming them keeps jax's own SLURM
# detection from pinning each process to GPU number SLURM_LOCALID.
export JAX_LOCAL_DEVICE_IDS=${gpu_ids}

cd $(quote "${REPO_ROOT}")
# One task per node with all the node's CPUs (for the input pipeline); the
# process id is only known inside each task, hence the small bash -c.
# --kill-on-bad-exit stops the survivors, which would hang in collectives.
# shellcheck disable=SC2016  # \$ in the bash -c body expands inside each task.
srun --nodes="\${SLURM_NNODES}" --ntasks-per-node=1 \\
  --gpus-per-node=${INFD_GPUS_PER_NODE} --cpus-per-task="\${SLURM_CPUS_ON_NODE}" \\
  --kill-on-bad-exit=1 --output=$(quote "${log_dir}/${INFD_JOB_NAME}-%j.%t.log") \\
  bash -c 'export INFD_PROCESS_ID="\${SLURM_PROCID}"; exec "\$@"' infd-task \\
  $(quote_all "${MAIN[@]}")
EOF
}

cmd_submit() {
  require INFD_NODES --nodes INFD_NODES
  require_int INFD_NODES --nodes
  require_int INFD_GPUS_PER_NODE --gpus-per-node
  [[ ${INFD_JOB_NAME} =~ ^[A-Za-z0-9_.-]+$ ]] ||
    die "--job-name may only hold letters, digits and _ . -"
  local log_dir="${INFD_LOG_DIR:-${REPO_ROOT}/logs/slurm}"
  local script_file
  script_file="${log_dir}/${INFD_JOB_NAME}-$(date +%Y%m%d-%H%M%S).sbatch"

  run_cmd mkdir -p "${log_dir}"
  if [[ ${DRY_RUN} == 1 ]]; then
    # Shown as the heredoc that would write it, so the transcript replays.
    echo "+ cat > $(quote "${script_file}") <<'SBATCH_EOF'"
    sbatch_script "${log_dir}"
    echo "SBATCH_EOF"
  else
    sbatch_script "${log_dir}" >"${script_file}"
    echo "wrote ${script_file}" >&2
  fi
  run_cmd sbatch "${script_file}"
}

cmd_local() {
  require_int INFD_LOCAL_PROCESSES --num-processes
  require_int INFD_LOCAL_DEVICES --devices-per-process
  local log_dir="${INFD_LOG_DIR:-${REPO_ROOT}/logs/local}"
  local n="${INFD_LOCAL_PROCESSES}" port="${INFD_COORDINATOR_PORT:-12355}"
  local pids=() i rc

  run_cmd mkdir -p "${log_dir}"
  cd "${REPO_ROOT}"
  for ((i = 0; i < n; i++)); do
    # --env comes last so that it can override the CPU settings.
    local cmd=(env JAX_PLATFORMS=cpu
      "XLA_FLAGS=--xla_force_host_platform_device_count=${INFD_LOCAL_DEVICES}"
      "INFD_COORDINATOR_ADDRESS=127.0.0.1:${port}"
      "INFD_NUM_PROCESSES=${n}" "INFD_PROCESS_ID=${i}" "${RUN_ENV[@]}" "${MAIN[@]}")
    local log="${log_dir}/process_${i}.log"
    if [[ ${DRY_RUN} == 1 ]]; then
      echo "+ $(quote_all "${cmd[@]}") > $(quote "${log}") 2>&1 &"
    else
      echo "+ $(quote_all "${cmd[@]}") > $(quote "${log}") 2>&1 &" >&2
      "${cmd[@]}" >"${log}" 2>&1 &
      pids+=("$!")
    fi
  done
  if [[ ${DRY_RUN} == 1 ]]; then
    echo "+ wait"
    return
  fi

  # A process that fails leaves the others blocked on it: stop them all.
  trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
  for ((i = 0; i < n; i++)); do
    rc=0
    wait -n || rc=$?
    if ((rc != 0)); then
      kill "${pids[@]}" 2>/dev/null || true
      die "a process exited with status ${rc}; logs: ${log_dir}/process_*.log"
    fi
  done
  echo "all ${n} processes finished; logs: ${log_dir}/process_*.log" >&2
}

"cmd_${SUBCOMMAND}"
