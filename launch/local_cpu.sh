#!/usr/bin/env bash
# A spacetime-jax job on this machine's CPU, as N virtual devices, in one process or as a
# local multi-process run (the way a multi-host job runs, on one machine).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

SCRIPT_NAME=local_cpu.sh

usage() {
  cat <<'EOF'
Usage: launch/local_cpu.sh --config CONFIG --workdir WORKDIR [--devices N] [--processes P]
                           [--port PORT] [--dry-run] [-- extra --config.key=value arguments]

Runs `$PYTHON -m spacetime_jax.main --config=CONFIG --workdir=WORKDIR [extra]` (PYTHON
defaults to python3) on the CPU (JAX_PLATFORMS=cpu). Run it from the checkout.

  --config CONFIG     e.g. configs/neti.py:demo
  --workdir WORKDIR   the run's folder (rerunning the same command resumes)
  --devices N         virtual CPU devices per process (default 1), through
                      XLA_FLAGS=--xla_force_host_platform_device_count=N
  --processes P       P processes (default 1) joined by jax.distributed: process 0 at
                      127.0.0.1:PORT coordinates; each gets the overrides
                      --config.distributed.{coordinator_address,num_processes,process_id}
                      (configs with a distributed section: configs/neti.py). Process 0
                      prints to the terminal, process i to WORKDIR/logs/process_i.log. When
                      one fails, the others are stopped.
  --port PORT         the coordinator's port (default 8476)
  --dry-run           print the commands instead of running them

Example:
  launch/local_cpu.sh --config configs/neti.py:demo --workdir runs/crescent --devices 4
  launch/local_cpu.sh --config configs/neti.py:demo --workdir runs/crescent-2p \
      --devices 2 --processes 2
EOF
}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

python=${PYTHON:-python3}
config="" workdir="" devices=1 processes=1 port=8476
extra_args=()

while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --config) require_value "$@"; config=$2; shift 2 ;;
    --workdir) require_value "$@"; workdir=$2; shift 2 ;;
    --devices) require_value "$@"; devices=$2; shift 2 ;;
    --processes) require_value "$@"; processes=$2; shift 2 ;;
    --port) require_value "$@"; port=$2; shift 2 ;;
    --) shift; extra_args=("$@"); break ;;
    *) die "unknown option '$1'" ;;
  esac
done

require_option --config "$config" "e.g. configs/neti.py:demo"
require_option --workdir "$workdir" "e.g. runs/crescent"
require_positive_int --devices "$devices"
require_positive_int --processes "$processes"
require_positive_int --port "$port"
((port < 65536)) || die "--port must be below 65536, got $port"

# Flags already in XLA_FLAGS stay; the device count comes last, so it wins.
xla_flags="--xla_force_host_platform_device_count=$devices"
if [[ -n ${XLA_FLAGS:-} ]]; then
  xla_flags="$XLA_FLAGS $xla_flags"
fi
job=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" "$python" -m spacetime_jax.main
  "--config=$config" "--workdir=$workdir")

if ((processes == 1)); then
  run "${job[@]}" ${extra_args[@]+"${extra_args[@]}"}
  exit 0
fi

# Job control puts each process in a process group of its own, so stopping one stops all it
# started too, and Ctrl-C reaches this script (which stops them) rather than each of them.
set -m
pids=()
stop_all() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    [[ -n $pid ]] && kill -TERM -- "-$pid" 2>/dev/null
  done
  return 0
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log_dir="${workdir%/}/logs"
run mkdir -p "$log_dir"
for ((process_id = 0; process_id < processes; process_id++)); do
  log_file=""
  if ((process_id > 0)); then
    log_file="$log_dir/process_$process_id.log"
  fi
  run_background "$log_file" "${job[@]}" \
    "--config.distributed.coordinator_address=127.0.0.1:$port" \
    "--config.distributed.num_processes=$processes" \
    "--config.distributed.process_id=$process_id" \
    ${extra_args[@]+"${extra_args[@]}"}
  if [[ -n $LAST_PID ]]; then
    pids+=("$LAST_PID")
  fi
done

if ((DRY_RUN)); then
  printf 'wait\n'
  exit 0
fi

# Polls rather than `wait -n` (bash >= 4.3): a failed process stops the rest at once.
running=${#pids[@]}
while ((running > 0)); do
  running=0
  for index in "${!pids[@]}"; do
    pid=${pids[index]}
    [[ -z $pid ]] && continue
    if kill -0 "$pid" 2>/dev/null; then
      running=$((running + 1))
      continue
    fi
    status=0
    wait "$pid" || status=$?
    pids[index]=""
    if ((status != 0)); then
      printf '%s: process %d exited with status %d; stopping the others\n' \
        "$SCRIPT_NAME" "$index" "$status" >&2
      exit "$status"
    fi
  done
  ((running == 0)) || sleep 1
done
trap - EXIT
