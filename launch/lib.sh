# shellcheck shell=bash
# Helpers shared by the launch scripts, which `source` this file after setting
# PROG (their name in messages); die/require/run_cmd also read SUBCOMMAND and
# DRY_RUN, which parse_args sets from the script's arguments.

# Empty arrays under `set -u` need bash >= 4.4 (macOS ships 3.2: use brew's).
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "${PROG}: error: needs bash >= 4.4, this is ${BASH_VERSION}" >&2
  exit 2
fi

die() {
  echo "${PROG}: error: $*" >&2
  echo "Run '${PROG} --help' for usage." >&2
  exit 2
}

# Quotes one word for a POSIX shell. Plain words stay bare so that printed
# commands and generated scripts stay readable. `~` is quoted unless the script
# sets BARE_TILDE=1 (tpu_pod.sh, so that `~` expands on the worker).
BARE_TILDE=0
quote() {
  local plain='^[A-Za-z0-9_./:=@%+,-]+$'
  [[ ${BARE_TILDE} != 1 ]] || plain='^[A-Za-z0-9_./:=@%+,~-]+$'
  if [[ $1 =~ ${plain} ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out=() word
  for word in "$@"; do out+=("$(quote "${word}")"); done
  printf '%s' "${out[*]}"
}

# Runs a command, or only prints it in dry-run mode. The printed line is a
# valid shell command, so dry-run output can be reviewed and pasted.
run_cmd() {
  if [[ ${DRY_RUN} == 1 ]]; then
    echo "+ $(quote_all "$@")"
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# `require VAR FLAG ENV` fails with the flag and env var to set when VAR is empty.
require() {
  [[ -n ${!1} ]] || die "${SUBCOMMAND} needs ${2} (or env ${3})"
}

# `require_int VAR FLAG` fails unless VAR is a positive integer.
require_int() {
  [[ ${!1} =~ ^[1-9][0-9]*$ ]] || die "${2} must be a positive integer, got '${!1}'"
}

# `add_env KEY=VALUE`: one --env entry for the training processes.
add_env() {
  [[ $1 == [A-Za-z_]*=* ]] || die "--env wants KEY=VALUE, got '$1'"
  RUN_ENV+=("$1")
}

# `parse_args "SUBCOMMAND ..." "$@"`: the flag loop of the launch scripts. Sets
# SUBCOMMAND (one of the listed), DRY_RUN and EXTRA_ARGS (what follows --); hands
# `--flag value` / `--flag=value` to the script's set_flag and other value-less
# flags to its set_switch, which returns 1 for a flag it does not know.
# shellcheck disable=SC2034  # EXTRA_ARGS is read by the sourcing script
parse_args() {
  local subcommands=" $1 "
  shift
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      --*=*) set_flag "${1%%=*}" "${1#*=}" ;;
      --*)
        if ! set_switch "$1"; then
          (($# >= 2)) || die "$1 needs a value"
          set_flag "$1" "$2"
          shift
        fi
        ;;
      *)
        [[ -z ${SUBCOMMAND} ]] || die "unexpected argument: $1 (extra args for main go after --)"
        SUBCOMMAND=$1
        ;;
    esac
    shift
  done
  [[ -n ${SUBCOMMAND} ]] || { usage >&2; die "missing SUBCOMMAND"; }
  [[ ${subcommands} == *" ${SUBCOMMAND} "* ]] || die "unknown subcommand: ${SUBCOMMAND}"
}
