#!/usr/bin/env bash
# Cloud TPU VM pod slice lifecycle for infd_jax: create, install, run, logs,
# stop, delete. Every step fans out with `gcloud ... --worker=all` because a
# pod slice is several VMs and each runs one JAX process; jax finds its peers
# on its own there (jax.distributed.initialize() reads the TPU metadata).
set -euo pipefail

readonly PROG="launch/tpu_pod.sh"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
BARE_TILDE=1  # Remote paths (`~/...`) must expand on the workers.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh SUBCOMMAND [FLAGS] [-- EXTRA ARGS FOR infd_jax.main]

Subcommands:
  create   Create the TPU VM pod slice.
  install  Ship the code to every worker and pip install it into a venv.
  run      Start `python -m infd_jax.main` on every worker in the background.
  logs     Tail a run's log on one worker (or all).
  stop     Kill the run's process (by its recorded pid) on every worker.
  delete   Delete the TPU VM pod slice (asks to confirm unless --yes).

Flags (each may also come from the environment variable in brackets):
  --name=NAME              TPU name [TPU_NAME] (required)
  --zone=ZONE              Zone, e.g. us-west4-a [TPU_ZONE] (required)
  --project=PROJECT        GCP project [TPU_PROJECT] (default: gcloud config)
  --accelerator-type=TYPE  e.g. v5litepod-32 [TPU_ACCELERATOR_TYPE] (create)
  --runtime-version=VER    TPU software version [TPU_RUNTIME_VERSION] (create;
                           default picked from the accelerator generation)
  --spot                   Create a Spot (preemptible) slice [TPU_SPOT=1]
  --repo-url=URL           git URL to clone on the workers [INFD_REPO_URL]
                           (install; default: copy this checkout's files)
  --ref=REF                Branch, tag or commit to check out [INFD_REPO_REF]
                           (default: main)
  --remote-dir=DIR         Code directory on the workers [INFD_REMOTE_DIR]
                           (default: ~/infd_jax)
  --venv=DIR               Python venv on the workers [INFD_VENV]
                           (default: ~/infd_venv)
  --log-dir=DIR            Log directory on the workers [INFD_LOG_DIR]
                           (default: ~/infd_logs)
  --config=PATH            Config file, relative to the repo [INFD_CONFIG] (run)
  --workdir=gs://...       Shared output dir [INFD_WORKDIR] (run)
  --run-name=NAME          Names the log and pid files [INFD_RUN_NAME]
                           (default: infd)
  --env=KEY=VALUE          Extra environment for the run (repeatable)
  --worker=N|all           Worker whose log to show (logs; default: 0)
  --lines=N                Log lines to show (logs; default: 100)
  --follow                 Keep following the log (logs)
  --yes                    Do not ask before deleting (delete)
  --dry-run                Print every command, one per line with "+ ", and
                           run nothing [DRY_RUN=1]
  -h, --help               Show this help.

Relative remote paths are taken from the worker's home directory.

Example:
  launch/tpu_pod.sh create  --name=infd --zone=us-west4-a --accelerator-type=v5litepod-32
  launch/tpu_pod.sh install --name=infd --zone=us-west4-a
  launch/tpu_pod.sh run     --name=infd --zone=us-west4-a \
      --config=configs/ffhq.py --workdir=gs://my-bucket/infd/ffhq -- \
      --config.train.batch_size=64
  launch/tpu_pod.sh logs    --name=infd --zone=us-west4-a --follow
EOF
}

# Like run_cmd, for a local pipeline given as one shell string.
run_shell() {
  if [[ ${DRY_RUN} == 1 ]]; then
    echo "+ $1"
  else
    echo "+ $1" >&2
    bash -c "set -euo pipefail; $1"
  fi
}

# Makes a remote path relative to the worker's home explicit (`~/...`), so
# that it still points there after the remote command changes directory.
home_path() {
  case "$1" in
    /* | \~ | \~/*) printf '%s' "$1" ;;
    *) printf '%s/%s' '~' "$1" ;;
  esac
}

# Prints a runtime version known to work for the accelerator generation.
default_runtime_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

# --- Parameters: environment first, flags override. ---
TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_ACCELERATOR_TYPE="${TPU_ACCELERATOR_TYPE:-}"
TPU_RUNTIME_VERSION="${TPU_RUNTIME_VERSION:-}"
TPU_SPOT="${TPU_SPOT:-0}"
INFD_REPO_URL="${INFD_REPO_URL:-}"
INFD_REPO_REF="${INFD_REPO_REF:-main}"
INFD_REMOTE_DIR="${INFD_REMOTE_DIR:-infd_jax}"
INFD_VENV="${INFD_VENV:-infd_venv}"
INFD_LOG_DIR="${INFD_LOG_DIR:-infd_logs}"
INFD_CONFIG="${INFD_CONFIG:-}"
INFD_WORKDIR="${INFD_WORKDIR:-}"
INFD_RUN_NAME="${INFD_RUN_NAME:-infd}"
DRY_RUN="${DRY_RUN:-0}"
WORKER=0
LINES_TO_SHOW=100
FOLLOW=0
YES=0
RUN_ENV=()
EXTRA_ARGS=()
SUBCOMMAND=""

set_flag() {
  case "$1" in
    --name) TPU_NAME=$2 ;;
    --zone) TPU_ZONE=$2 ;;
    --project) TPU_PROJECT=$2 ;;
    --accelerator-type) TPU_ACCELERATOR_TYPE=$2 ;;
    --runtime-version) TPU_RUNTIME_VERSION=$2 ;;
    --repo-url) INFD_REPO_URL=$2 ;;
    --ref) INFD_REPO_REF=$2 ;;
    --remote-dir) INFD_REMOTE_DIR=$2 ;;
    --venv) INFD_VENV=$2 ;;
    --log-dir) INFD_LOG_DIR=$2 ;;
    --config) INFD_CONFIG=$2 ;;
    --workdir) INFD_WORKDIR=$2 ;;
    --run-name) INFD_RUN_NAME=$2 ;;
    --env) add_env "$2" ;;
    --worker) WORKER=$2 ;;
    --lines) LINES_TO_SHOW=$2 ;;
    *) die "unknown flag: $1" ;;
  esac
}

set_switch() {
  case "$1" in
    --spot) TPU_SPOT=1 ;;
    --follow) FOLLOW=1 ;;
    --yes) YES=1 ;;
    *) return 1 ;;
  esac
}

parse_args "create install run logs stop delete" "$@"

require TPU_NAME --name TPU_NAME
require TPU_ZONE --zone TPU_ZONE

# Flags shared by every gcloud call that addresses the slice.
SCOPE=("--zone=${TPU_ZONE}")
[[ -z ${TPU_PROJECT} ]] || SCOPE+=("--project=${TPU_PROJECT}")

# Remote paths and the run name go into remote command lines unquoted (so that
# `~` expands there); keep them to characters that need no quoting.
for value in "${INFD_REMOTE_DIR}" "${INFD_VENV}" "${INFD_LOG_DIR}" "${INFD_RUN_NAME}"; do
  [[ ${value} =~ ^[A-Za-z0-9_./~-]+$ ]] ||
    die "'${value}' may only hold letters, digits and _ . / ~ -"
done
REMOTE_DIR="$(home_path "${INFD_REMOTE_DIR}")"
VENV="$(home_path "${INFD_VENV}")"
LOG_DIR="$(home_path "${INFD_LOG_DIR}")"
LOG_FILE="${LOG_DIR}/${INFD_RUN_NAME}.log"
PID_FILE="${LOG_DIR}/${INFD_RUN_NAME}.pid"

# Runs one shell command line on every worker of the slice.
on_all_workers() {
  run_cmd gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${SCOPE[@]}" \
    --worker=all --command="$1"
}

cmd_create() {
  require TPU_ACCELERATOR_TYPE --accelerator-type TPU_ACCELERATOR_TYPE
  if [[ -z ${TPU_RUNTIME_VERSION} ]]; then
    TPU_RUNTIME_VERSION="$(default_runtime_version "${TPU_ACCELERATOR_TYPE}")" ||
      die "no default runtime version for ${TPU_ACCELERATOR_TYPE}; pass --runtime-version"
  fi
  local extra=()
  [[ ${TPU_SPOT} != 1 ]] || extra+=(--spot)
  run_cmd gcloud compute tpus tpu-vm create "${TPU_NAME}" "${SCOPE[@]}" \
    --accelerator-type="${TPU_ACCELERATOR_TYPE}" \
    --version="${TPU_RUNTIME_VERSION}" "${extra[@]}"
}

cmd_install() {
  # One pin for jax everywhere: take it from requirements.txt.
  local jax_version
  jax_version="$(sed -n 's/^jax==\([^[:space:]#]*\).*/\1/p' "${REPO_ROOT}/requirements.txt")"
  [[ -n ${jax_version} ]] || die "no 'jax==VERSION' line in ${REPO_ROOT}/requirements.txt"

  local fetch_code
  if [[ -n ${INFD_REPO_URL} ]]; then
    # init + fetch + forced checkout is idempotent and accepts a branch, tag
    # or commit, so a second install updates the code in place.
    fetch_code="mkdir -p ${REMOTE_DIR} && cd ${REMOTE_DIR} && git init -q"
    fetch_code+=" && { git remote add origin $(quote "${INFD_REPO_URL}") 2>/dev/null"
    fetch_code+=" || git remote set-url origin $(quote "${INFD_REPO_URL}"); }"
    fetch_code+=" && git fetch -q --depth=1 origin $(quote "${INFD_REPO_REF}")"
    fetch_code+=" && git checkout -q --force FETCH_HEAD"
  else
    # Ship exactly what git sees here: tracked and untracked files, minus the
    # ignored ones (no venvs, caches or local workdirs).
    local tarball="${TMPDIR:-/tmp}/${TPU_NAME}-infd_jax-src.tgz"
    local repo
    repo="$(quote "${REPO_ROOT}")"
    run_shell "git -C ${repo} ls-files -z --cached --others --exclude-standard \
| tar -C ${repo} --null -T - -czf $(quote "${tarball}")"
    run_cmd gcloud compute tpus tpu-vm scp "${tarball}" \
      "${TPU_NAME}:infd_jax-src.tgz" "${SCOPE[@]}" --worker=all
    run_cmd rm -f "${tarball}"
    fetch_code="mkdir -p ${REMOTE_DIR}"
    fetch_code+=" && tar -xzf ~/infd_jax-src.tgz -C ${REMOTE_DIR}"
    fetch_code+=" && rm -f ~/infd_jax-src.tgz && cd ${REMOTE_DIR}"
  fi

  # The pinned jax needs Python >= 3.11, newer than the system Python of the
  # TPU images (Ubuntu 22.04), so uv provides the interpreter and the venv.
  # (Paths follow their flag after a space: `--flag=~/x` would not expand `~`.)
  local setup="python3 -m pip install --user -q uv==0.13.9"
  setup+=" && python3 -m uv venv -q --allow-existing --seed --python 3.11 ${VENV}"
  setup+=" && python3 -m uv pip install -q --python ${VENV}/bin/python"
  setup+=" -r requirements.txt $(quote "jax[tpu]==${jax_version}")"
  on_all_workers "${fetch_code} && ${setup}"
}

cmd_run() {
  require INFD_CONFIG --config INFD_CONFIG
  require INFD_WORKDIR --workdir INFD_WORKDIR
  if [[ ${INFD_WORKDIR} != gs://* ]]; then
    # Orbax writes one checkpoint from all hosts; a worker-local path would
    # leave each worker with a different, partial copy.
    echo "${PROG}: warning: --workdir=${INFD_WORKDIR} is not gs://;" \
      "it must be shared by all workers" >&2
  fi
  local main=("${VENV}/bin/python" -m infd_jax.main
    "--config=${INFD_CONFIG}" "--workdir=${INFD_WORKDIR}" "${EXTRA_ARGS[@]}")
  ((${#RUN_ENV[@]} == 0)) || main=(env "${RUN_ENV[@]}" "${main[@]}")

  # A TPU can be held by one process only: refuse to start a second run.
  local remote="mkdir -p ${LOG_DIR}"
  remote+="; if [ -f ${PID_FILE} ] && kill -0 \"\$(cat ${PID_FILE})\" 2>/dev/null;"
  remote+=" then echo \"${INFD_RUN_NAME} is already running on \$(hostname)\" >&2; exit 1; fi"
  # nohup + closed stdin lets the job outlive the ssh session; exec keeps $!
  # equal to the python pid, which `stop` kills.
  remote+="; (cd ${REMOTE_DIR} && exec nohup $(quote_all "${main[@]}"))"
  remote+=" > ${LOG_FILE} 2>&1 < /dev/null & echo \$! > ${PID_FILE}"
  on_all_workers "${remote}"
}

cmd_logs() {
  local tail_cmd=(tail -n "${LINES_TO_SHOW}")
  [[ ${FOLLOW} != 1 ]] || tail_cmd+=(-F)
  run_cmd gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${SCOPE[@]}" \
    --worker="${WORKER}" --command="$(quote_all "${tail_cmd[@]}") ${LOG_FILE}"
}

cmd_stop() {
  local remote="if [ -f ${PID_FILE} ]; then"
  remote+=" kill \"\$(cat ${PID_FILE})\" 2>/dev/null || true; rm -f ${PID_FILE}; fi"
  on_all_workers "${remote}"
}

cmd_delete() {
  local extra=()
  [[ ${YES} != 1 ]] || extra+=(--quiet)
  run_cmd gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${SCOPE[@]}" "${extra[@]}"
}

"cmd_${SUBCOMMAND}"
