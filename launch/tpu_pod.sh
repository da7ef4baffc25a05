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
             --workdir WORKDIR    gs://BUCKET/PATH, or a folder on the worker: relative to
                                  ~/spacetime-jax, or absolute. Passed to every worker as
                                  given. The workers of a pod slice do not share a disk: a
                                  job on more than one worker needs a gs:// workdir, and
                                  run refuses any other (before it sends anything)
             --worker WORKERS     all (default), or e.g. 0, 0,2 or 0-3: which workers run
                                  the job
             --worker-count N     how many workers the slice has, for that check; else it
                                  comes from --type when given (v2, v3, v4, v5p: the number
                                  counts TensorCores, 8 to a host, v4-32 -> 4 workers;
                                  v5litepod (v5e), v6e: it counts chips, up to 8 on one host,
                                  else 4 to a host, v5litepod-16 -> 4 workers), else from
                                  `gcloud compute tpus tpu-vm describe` (a dry run, which
                                  calls nothing, needs --worker-count or --type there)
             --shared-workdir     WORKDIR is on a filesystem every worker mounts (NFS,
                                  Filestore): skip the check
             --follow             run in the foreground and stream the output (the job
                                  stops when the ssh session does)
             --no-distributed     leave out --config.distributed.coordinator_address=auto
                                  (JAX's auto-detection of the pod's processes); for configs
                                  without a distributed section, run with --worker 0
  logs     a run's progress: for a gs:// workdir, WORKDIR/metrics.jsonl so far (gcloud
           storage cat, from here), then, for any workdir, follow a worker's log
             --workdir WORKDIR    the run's --workdir
             --worker N           whose log (default 0)
             --metrics            only WORKDIR/metrics.jsonl, no log: gcloud storage cat
                                  for gs://, else followed on the worker (worker N, default
                                  0: process 0 writes it)
  fetch    copy a run's outputs here, into DIR/<workdir name>: validation grids, concept
           and encoder artifacts, metrics.jsonl, tensorboard, ...; for gs://, with gcloud
           storage rsync (a second fetch copies only what is new), else scp from a worker
             --workdir WORKDIR    the run's --workdir (gs://... or a path on the worker)
             --to DIR             local destination folder (default .)
             --checkpoints        gs://: also the checkpoints (left out by default); the
                                  latent cache and the process tokens are always left out.
                                  A workdir on a worker comes whole, by scp (checkpoints
                                  too: scp cannot leave folders out)
             --worker N           for a workdir on a worker: which one (default 0)
  delete   delete the pod slice

Every gcloud command carries --zone (except gcloud storage) and --project when given.
Commands to all workers (--worker=all) need your key in ssh-agent first:
  ssh-add ~/.ssh/google_compute_engine

Example:
  launch/tpu_pod.sh create  --name my-pod --zone us-central2-b --type v4-32
  launch/tpu_pod.sh install --name my-pod --zone us-central2-b
  launch/tpu_pod.sh run     --name my-pod --zone us-central2-b --config configs/neti.py:sd15 \
      --workdir gs://my-bucket/runs/cat -- --config.data.images=gs://my-bucket/data/cat
  launch/tpu_pod.sh logs    --name my-pod --zone us-central2-b --workdir gs://my-bucket/runs/cat
  launch/tpu_pod.sh fetch   --name my-pod --zone us-central2-b --workdir gs://my-bucket/runs/cat \
      --to results
  launch/tpu_pod.sh delete  --name my-pod --zone us-central2-b
EOF
}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REMOTE_DIR=spacetime-jax
METRICS_FILE=metrics.jsonl  # spacetime_jax/training/progress.py's METRICS_FILE
REMOTE_TARBALL=spacetime-jax.tar.gz
LIBTPU_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html

subcommand=""
name="" zone="" project=""
accelerator_type=v4-32 runtime=tpu-ubuntu2204-base capacity=""
ref=HEAD python=python3.11
config="" workdir="" worker="" follow=0 distributed=1
type_given=0 worker_count="" shared_workdir=0 metrics_only=0 checkpoints=0
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
    --type) require_value "$@"; accelerator_type=$2; type_given=1; shift 2 ;;
    --runtime) require_value "$@"; runtime=$2; shift 2 ;;
    --spot) capacity=--spot; shift ;;
    --preemptible) capacity=--preemptible; shift ;;
    --ref) require_value "$@"; ref=$2; shift 2 ;;
    --python) require_value "$@"; python=$2; shift 2 ;;
    --config) require_value "$@"; config=$2; shift 2 ;;
    --workdir) require_value "$@"; workdir=$2; shift 2 ;;
    --worker) require_value "$@"; worker=$2; shift 2 ;;
    --worker-count) require_value "$@"; worker_count=$2; shift 2 ;;
    --shared-workdir) shared_workdir=1; shift ;;
    --follow) follow=1; shift ;;
    --no-distributed) distributed=0; shift ;;
    --metrics) metrics_only=1; shift ;;
    --to) require_value "$@"; destination=$2; shift 2 ;;
    --checkpoints) checkpoints=1; shift ;;
    --) shift; extra_args=("$@"); break ;;
    *) die "unknown option '$1' for $subcommand" ;;
  esac
done

require_option --name "$name" "the pod slice's name"
require_option --zone "$zone" "e.g. us-central2-b"
if ((${#extra_args[@]})) && [[ $subcommand != run ]]; then
  die "arguments after -- are passed to the job; only run takes them"
fi
if [[ $workdir == gs:* && ! $workdir =~ ^gs://[^/]+ ]]; then
  die "--workdir $workdir names no bucket: gs://BUCKET/PATH"
fi
[[ -z $worker_count ]] || require_positive_int --worker-count "$worker_count"
if [[ -n $worker ]]; then
  if [[ $subcommand == run ]]; then
    [[ $worker =~ ^(all|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*)$ ]] ||
      die "--worker takes all, a worker index, or indices and ranges such as 0,2 or 0-3; got '$worker'"
  else
    [[ $worker =~ ^[0-9]+$ ]] || die "--worker takes one worker index for $subcommand; got '$worker'"
  fi
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

# remote_path as one word of a remote command line: quoted where needed, a leading ~/ left
# for the worker's shell to expand.
# shellcheck disable=SC2088  # the ~ is the worker's, expanded by its shell, not this one
remote_word() {
  local path
  path=$(remote_path "$1")
  if [[ $path == "~/"* ]]; then
    printf '~/%s' "$(quote_word "${path#"~/"}")"
  else
    quote_word "$path"
  fi
}

# The last part of WORKDIR (trailing slashes dropped): it names the run's log and the folder
# fetch copies into.
workdir_name() {
  local trimmed=$1
  while [[ $trimmed == */ ]]; do trimmed=${trimmed%/}; done
  printf '%s' "${trimmed##*/}"
}

log_file_for() {
  printf 'logs/%s.log' "$(workdir_name "$1")"
}

# A folder (local, on a worker, or gs://) joined with a name inside it.
join_path() {
  local base=$1
  while [[ $base == */ ]]; do base=${base%/}; done
  printf '%s/%s' "$base" "$2"
}

# The workers of a slice of accelerator type $1, or nothing for a type this does not know.
# v2, v3, v4 and v5p types count TensorCores: 8 to a host (v4, v5p: 4 chips of 2 cores), so
# v4-8 is one host and v4-32 four. v5e (v5litepod) and v6e types count chips: up to 8 on a
# single host, 4 to a host in larger slices, so v5litepod-16 is four hosts.
workers_of_type() {
  [[ $1 =~ ^(v2|v3|v4|v5p|v5litepod|v5e|v6e)-([1-9][0-9]*)$ ]] || return 0
  local generation=${BASH_REMATCH[1]} size=${BASH_REMATCH[2]}
  case $generation in
    v2 | v3 | v4 | v5p) printf '%s' $((size > 8 ? size / 8 : 1)) ;;
    *) printf '%s' $((size > 8 ? size / 4 : 1)) ;;
  esac
}

# How many workers the slice has: --worker-count, else --type, else gcloud's description of
# the slice (one endpoint per worker). A dry run calls nothing, so it needs one of the two.
slice_workers() {
  if [[ -n $worker_count ]]; then
    printf '%s' "$worker_count"
  elif ((type_given)); then
    local count
    count=$(workers_of_type "$accelerator_type")
    [[ -n $count ]] || refuse "cannot tell how many workers a $accelerator_type slice has: give --worker-count N"
    printf '%s' "$count"
  elif ((DRY_RUN)); then
    refuse "a dry run does not ask gcloud how many workers $name has, which decides whether --workdir $workdir can work: give --worker-count N or --type TYPE"
  else
    local count
    if ! count=$(tpu_vm describe "$name" "--format=value(networkEndpoints.len())") ||
      [[ ! $count =~ ^[1-9][0-9]*$ ]]; then
      local said=""
      [[ -z $count ]] || said=" (it said '$count')"
      refuse "could not ask gcloud how many workers $name has$said: give --worker-count N or --type TYPE"
    fi
    printf '%s' "$count"
  fi
}

# How many workers --worker picks: all of them, or the indices and ranges it lists.
selected_workers() {
  local selection=${worker:-all}
  if [[ $selection == all ]]; then
    slice_workers
    return
  fi
  local part first last total=0
  local -a parts
  IFS=, read -ra parts <<<"$selection"
  for part in "${parts[@]}"; do
    first=$((10#${part%-*})) last=$((10#${part#*-}))
    ((last >= first)) || die "--worker range $part runs backwards"
    total=$((total + last - first + 1))
  done
  printf '%s' "$total"
}

# A job on several workers needs a workdir they all see: gs://, or a shared filesystem the
# user vouches for with --shared-workdir. Anything else would give each worker its own half
# of the run (process 0's metrics and grids on one disk, checkpoint shards on all), so it
# ends here, before anything is sent.
check_workdir_is_shared() {
  [[ $workdir == gs://* ]] && return 0
  ((shared_workdir)) && return 0
  local count
  count=$(selected_workers) || exit
  ((count > 1)) || return 0
  local suggestion=$workdir
  while [[ $suggestion == */ ]]; do suggestion=${suggestion%/}; done
  case $suggestion in
    /* | '~'*) suggestion=$(workdir_name "$suggestion") ;;
    ./*) suggestion=${suggestion#./} ;;
  esac
  refuse "the $count pod-slice workers that would run the job do not share a disk, so --workdir $workdir would be $count separate folders: use --workdir=gs://BUCKET/$suggestion (or --shared-workdir if every worker mounts it)"
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
  local remote_install="set -e; mkdir -p $REMOTE_DIR; tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR; $make_venv || { $apt_python && $make_venv --clear; }; $venv_python -m pip install -q --upgrade pip; $venv_python -m pip install -q -c $REMOTE_DIR/constraints.txt -e $REMOTE_DIR \"jax[tpu]\" -f $LIBTPU_LINKS"
  run mkdir -p "$REPO_ROOT/dist"
  run git -C "$REPO_ROOT" archive --format=tar.gz "--output=$tarball" "$ref"
  tpu_vm scp "$tarball" "$name:$REMOTE_TARBALL" --worker=all
  tpu_vm ssh "$name" --worker=all "--command=$remote_install"
}

run_on_workers() {
  require_option --config "$config" "e.g. configs/neti.py:sd15"
  require_option --workdir "$workdir" "e.g. gs://BUCKET/runs/cat"
  check_workdir_is_shared
  local job=(.venv/bin/python -m spacetime_jax.main "--config=$config" "--workdir=$workdir")
  ((distributed)) && job+=(--config.distributed.coordinator_address=auto)
  job+=(${extra_args[@]+"${extra_args[@]}"})
  local log_file command
  log_file=$(quote_word "$(log_file_for "$workdir")")
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

# gcloud storage (not gsutil) for everything in a bucket: it is what Google maintains and
# documents now (gsutil is its legacy), it copies in parallel without gsutil's -m, and it
# takes the same --project as the gcloud commands here.
gcs() {
  run gcloud storage "$@" ${project_flags[@]+"${project_flags[@]}"}
}

# The progress so far: the JSON lines process 0 writes to WORKDIR/metrics.jsonl every
# log_every steps (the object is replaced whole each time, so it reads as it stands).
show_gcs_metrics() {
  local metrics
  metrics=$(join_path "$workdir" "$METRICS_FILE")
  if ! gcs cat "$metrics"; then
    printf '%s: no %s to show yet (the run writes it from its first log step on), or gcloud could not read it (see above)\n' \
      "$SCRIPT_NAME" "$metrics" >&2
    ((metrics_only)) && exit 1
  fi
  return 0
}

follow_log() {
  require_option --workdir "$workdir" "the run's --workdir"
  if ((metrics_only)) && [[ $workdir != gs://* ]]; then
    tpu_vm ssh "$name" "--worker=${worker:-0}" \
      "--command=tail -n +1 -F $(remote_word "$(join_path "$workdir" "$METRICS_FILE")")"
    return
  fi
  [[ $workdir == gs://* ]] && show_gcs_metrics
  ((metrics_only)) && return
  # The worker's log is on its own disk whatever the workdir: run sends the job's output there.
  tpu_vm ssh "$name" "--worker=${worker:-0}" \
    "--command=tail -n 100 -F $REMOTE_DIR/$(quote_word "$(log_file_for "$workdir")")"
}

fetch_results() {
  require_option --workdir "$workdir" "the run's --workdir, or a gs:// path"
  if [[ $workdir == gs://* ]]; then
    local target
    target=$(join_path "$destination" "$(workdir_name "$workdir")")
    # rsync rather than cp --recursive: cp cannot leave the checkpoints out, and a second
    # fetch during a run copies only what is new. --exclude takes Python regexes, matched
    # against paths relative to WORKDIR: cache/ (latents, rebuilt when missing) and
    # .spacetime/ (the processes' workdir tokens) are never worth copying.
    local skip='cache|\.spacetime'
    ((checkpoints)) || skip="checkpoints|$skip"
    run mkdir -p "$target"
    gcs rsync --recursive "--exclude=^($skip)/" "$workdir" "$target"
  else
    # A folder on a worker (a single-worker run): scp copies it whole into DESTINATION.
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
