# shellcheck shell=bash
# Helpers the launch scripts share; sourced, never run. Each script sets SCRIPT_NAME and
# defines usage() before it sources this file.
#
# Commands go through `run`: under --dry-run it prints the command, one line, quoted the way
# Python's shlex.join quotes (so a printed line pastes back into a shell and round-trips
# through shlex.split in the tests); otherwise it echoes the line to stderr and runs it.

# Repository root: the launch scripts ship and install this checkout.
# shellcheck disable=SC2034  # used by the scripts that source this file
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
DRY_RUN=0

# One word, quoted only when the shell would otherwise split or expand it.
quote_word() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    local squote="'" escaped="'\"'\"'"
    printf "'%s'" "${word//$squote/$escaped}"
  fi
}

# All arguments as one shell line.
quote_line() {
  local word sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    quote_word "$word"
    sep=" "
  done
}

run() {
  if ((DRY_RUN)); then
    quote_line "$@"
    printf '\n'
  else
    printf '+ %s\n' "$(quote_line "$@")" >&2
    "$@"
  fi
}

# Starts a command in the background, its output to log_file ("" keeps the terminal). The pid
# lands in LAST_PID; under --dry-run the line ends in "&", as a script would have it.
# shellcheck disable=SC2034  # read by the scripts that source this file
LAST_PID=""
run_background() {
  local log_file=$1
  shift
  local redirect=""
  [[ -n $log_file ]] && redirect=" > $(quote_word "$log_file") 2>&1"
  if ((DRY_RUN)); then
    printf '%s%s &\n' "$(quote_line "$@")" "$redirect"
    LAST_PID=""
    return
  fi
  printf '+ %s%s &\n' "$(quote_line "$@")" "$redirect" >&2
  if [[ -n $log_file ]]; then
    "$@" > "$log_file" 2>&1 &
  else
    "$@" &
  fi
  LAST_PID=$!
}

die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$1" >&2
  printf 'Run %s --help for usage.\n' "$SCRIPT_NAME" >&2
  exit 2
}

# Ends the script with one line on stderr and status 2, for a request that parses but would
# not work, where the line itself says what to change (so no pointer to --help).
refuse() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$1" >&2
  exit 2
}

# Checks that an option has a value: `require_value "$@"` with the option in $1.
require_value() {
  local option=$1
  (($# >= 2)) || die "$option needs a value"
  [[ $2 != --* ]] || die "$option needs a value (got the option $2)"
}

require_option() {
  local option=$1 value=$2 hint=${3:-}
  [[ -n $value ]] || die "$option is required${hint:+ ($hint)}"
}

require_positive_int() {
  local option=$1 value=$2
  [[ $value =~ ^[1-9][0-9]*$ ]] || die "$option must be a positive whole number, got '$value'"
}
