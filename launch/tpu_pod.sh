#!/usr/bin/env bash
# A spacetime-jax job on a Cloud TPU VM pod slice: create, install, run, logs, fetch, delete.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

SCRIPT_NAME=tpu_pod.sh

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh SUBCOMMAND --name NAME --zone ZONE [--project PROJECT] [--dry-run]
                         [options] [-- extra --config.key=value arguments for run]

Subcommands (each is one or two gcloud commands; --dry-run prints them instead):
  create   create the pod slice
             --type TYPE          accelerator type (default v4-32)
             --runtime VERSION    TPU software version (default tpu-ubuntu2204-base;
                                  v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
                                  v6e: v2-alpha-tpuv6e)
             --spot | --preemptible
  install  ship this checkout's git commit (git archive --ref, default HEAD: commit first)
           to every worker and install it there, with jax[tpu], into ~/spacetime-jax/.venv
             --ref REF            the commit to ship (default HEAD)
             --python PYTHON      the workers' interpreter for the venv (default python3.11;
                                  installed with apt when missing; jax needs >= 3.11)
  run      run `python -m spacetime_jax.main --config=CONFIG --workdir=WORKDIR [extra]` in
           ~/spacetime-jax on the workers, in the background (nohup), the output of each
           worker in its ~/spacetime-jax/logs/<workdir name>.log
             --config CONFIG      e.g. configs/neti.py:sd15 (a path in the checkout)
             --workdir WORKDIR    relative to ~/spacetime-jax, or absolute (a gs://
                                  path is passed on as is, for jobs that write
                                  through gs://)
             --worker WORKERS     all (default), or e.g. 0: which workers run the job
             --follow             run in the foreground and stream the output (the job
                                  stops when the ssh session does)
             --no-distributed     leave out --config.distributed.coordinator_address=auto
                                  (JAX's auto-detection of the pod's processes); for configs
                                  without a distributed section, run with --worker 0
  logs     follow a worker's log of a run
             --workdir WORKDIR    the run's --workdir
             --worker N           (default 0)
  fetch    copy a run's results here: gcloud storage for gs://, else scp from a worker
             --workdir WORKDIR    the run's --workdir (gs://... or a path on the worker)
             --to DIR             local destination folder (default .)
             --worker N           (default 0)
  delete   delete the pod slice

Every gcloud command carries --zone (except gcloud storage) and --project when given.
Commands to all workers (--worker=all) need your key in ssh-agent first:
  ssh-add ~/.ssh/google_compute_engine

Example:
  launch/tpu_pod.sh create  --name my-pod --zone us-central2-b --type v4-32
  launch/tpu_pod.sh install --name my-pod --zone us-central2-b
  launch/tpu_pod.sh run     --name my-pod --zone us-central2-b \
      --config configs/neti.py:sd15 --workdir runs/cat -- --config.data.images=data/cat
  launch/tpu_pod.sh logs    --name my-pod --zone us-central2-b --workdir runs/cat
  launch/tpu_pod.sh fetch   --name my-pod --zone us-central2-b --workdir runs/cat --to results
  launch/tpu_pod.sh delete  --name my-pod --zone us-central2-b
EOF
}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REMOTE_DIR=spacetime-jax
REMOTE_TARBALL=spacetime-jax.tar.gz
LIBTPU_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html

subcommand=""
name="" zone="" project=""
accelerator_type=v4-32 runtime=tpu-ubuntu2204-base capacity=""
ref=HEAD python=python3.11
config="" workdir="" worker="" follow=0 distributed=1
destination=.
extra_args=()

if (($# == 0)); then
  usage >&2
  exit 2
fi
case $1 in
  -h | --help) usage; exit 0 ;;
  create | install | run | logs | fetch | delete) subcommand=$1; shift ;;
  *) die "unknown subcommand '$1' (create, install, run, logs, fetch, delete)" ;;
esac

while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --name) require_value "$@"; name=$2; shift 2 ;;
    --zone) require_value "$@"; zone=$2; shift 2 ;;
    --project) require_value "$@"; project=$2; shift 2 ;;
    --type) require_value "$@"; accelerator_type=$2; shift 2 ;;
    --runtime) require_value "$@"; runtime=$2; shift 2 ;;
    --spot) capacity=--spot; shift ;;
    --preemptible) capacity=--preemptible; shift ;;
    --ref) require_value "$@"; ref=$2; shift 2 ;;
    --python) require_value "$@"; python=$2; shift 2 ;;
    --config) require_value "$@"; config=$2; shift 2 ;;
    --workdir) require_value "$@"; workdir=$2; shift 2 ;;
    --worker) require_value "$@"; worker=$2; shift 2 ;;
    --follow) follow=1; shift ;;
    --no-distributed) distributed=0; shift ;;
    --to) require_value "$@"; destination=$2; shift 2 ;;
    --) shift; extra_args=("$@"); break ;;
    *) die "unknown option '$1' for $subcommand" ;;
  esac
done

require_option --name "$name" "the pod slice's name"
require_option --zone "$zone" "e.g. us-central2-b"
if ((${#extra_args[@]})) && [[ $subcommand != run ]]; then
  die "arguments after -- are passed to the job; only run takes them"
fi

# The flags every gcloud compute command takes.
location_flags=("--zone=$zone")
project_flags=()
[[ -n $project ]] && project_flags=("--project=$project")
location_flags+=(${project_flags[@]+"${project_flags[@]}"})

tpu_vm() {
  run gcloud compute tpus tpu-vm "$@" "${location_flags[@]}"
}

# Where WORKDIR lands on a worker: relative paths are inside the checkout, as in `run`.
remote_path() {
  case $1 in
    /* | '~'* | gs://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$REMOTE_DIR" "$1" ;;
  esac
}

log_file_for() {
  local trimmed=${1%/}
  printf 'logs/%s.log' "${trimmed##*/}"
}

create_pod() {
  tpu_vm create "$name" "--accelerator-type=$accelerator_type" "--version=$runtime" \
    ${capacity:+"$capacity"}
}

install_on_workers() {
  local tarball="$REPO_ROOT/dist/$REMOTE_TARBALL"
  local py venv_python="$REMOTE_DIR/.venv/bin/python"
  py=$(quote_word "$python")
  # The runtime images carry an older python3 than jax needs: a venv of $python, with apt
  # supplying it (and its venv module) where the image lacks it.
  local make_venv="$py -m venv $REMOTE_DIR/.venv"
  local apt_python
  apt_python="sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(quote_word "$python-venv")"
  local remote_install="set -e; mkdir -p $REMOTE_DIR; tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR; $make_venv || { $apt_python && $make_venv --clear; }; $venv_python -m pip install -q --upgrade pip; $venv_python -m pip install -q -e $REMOTE_DIR \"jax[tpu]\" -f $LIBTPU_LINKS"
  run mkdir -p "$REPO_ROOT/dist"
  run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$tarball" "$ref"
  tpu_vm scp "$tarball" "$name:$REMOTE_TARBALL" --worker=all
  tpu_vm ssh "$name" --worker=all "--command=$remote_install"
}

run_on_workers() {
  require_option --config "$config" "e.g. configs/neti.py:sd15"
  require_option --workdir "$workdir" "e.g. runs/cat"
  local job=(.venv/bin/python -m spacetime_jax.main "--config=$config" "--workdir=$workdir")
  ((distributed)) && job+=(--config.distributed.coordinator_address=auto)
  job+=(${extra_args[@]+"${extra_args[@]}"})
  local log_file command
  log_file=$(log_file_for "$workdir")
  if ((follow)); then
    command="cd $REMOTE_DIR && mkdir -p logs && set -o pipefail && $(quote_line "${job[@]}") 2>&1 | tee $log_file"
  else
    command="cd $REMOTE_DIR && mkdir -p logs && nohup $(quote_line "${job[@]}") > $log_file 2>&1 < /dev/null &"
  fi
  tpu_vm ssh "$name" "--worker=${worker:-all}" "--command=$command"
  if ((!follow && !DRY_RUN)); then
    printf 'started; follow worker 0 with: launch/tpu_pod.sh logs --name %s --zone %s --workdir %s\n' \
      "$name" "$zone" "$(quote_word "$workdir")" >&2
  fi
}

follow_log() {
  require_option --workdir "$workdir" "the run's --workdir"
  tpu_vm ssh "$name" "--worker=${worker:-0}" \
    "--command=tail -n 100 -F $REMOTE_DIR/$(log_file_for "$workdir")"
}

fetch_results() {
  require_option --workdir "$workdir" "the run's --workdir, or a gs:// path"
  if [[ $workdir == gs://* ]]; then
    run gcloud storage cp --recursive "$workdir" "$destination" \
      ${project_flags[@]+"${project_flags[@]}"}
  else
    run mkdir -p "$destination"
    tpu_vm scp --recurse "$name:$(remote_path "$workdir")" "$destination" "--worker=${worker:-0}"
  fi
}

case $subcommand in
  create) create_pod ;;
  install) install_on_workers ;;
  run) run_on_workers ;;
  logs) follow_log ;;
  fetch) fetch_results ;;
  delete) tpu_vm delete "$name" --quiet ;;
esac
