#!/usr/bin/env bash
# A spacetime-jax job on one host with one or more GPUs: one process drives them all (JAX is
# single-controller on one host; the config's mesh spreads the work over the visible GPUs).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

SCRIPT_NAME=gpu_host.sh

usage() {
  cat <<'EOF'
Usage: launch/gpu_host.sh --config CONFIG --workdir WORKDIR [--gpus 0,1,...]
                          [--mem-fraction F] [--install] [--dry-run]
                          [-- extra --config.key=value arguments]

Runs `$PYTHON -m spacetime_jax.main --config=CONFIG --workdir=WORKDIR [extra]` (PYTHON
defaults to python3) in one process that sees every visible GPU. Run it from the checkout.

  --config CONFIG     e.g. configs/neti.py:sd15
  --workdir WORKDIR   the run's folder (rerunning the same command resumes)
  --gpus LIST         only these GPUs (sets CUDA_VISIBLE_DEVICES), e.g. 0,1
  --mem-fraction F    XLA_PYTHON_CLIENT_MEM_FRACTION, the share of each GPU's memory JAX
                      takes up front (default 0.9, or the variable's value when set)
  --install           first `pip install -c constraints.txt -e <checkout> "jax[cuda12]"`; alone, only that
  --dry-run           print the commands instead of running them

Example:
  launch/gpu_host.sh --install
  launch/gpu_host.sh --config configs/neti.py:sd15 --workdir runs/cat --gpus 0,1 \
      -- --config.data.images=data/cat --config.concept.placeholder='<my-cat>'
EOF
}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

python=${PYTHON:-python3}
config="" workdir="" gpus="" install=0
mem_fraction=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
extra_args=()

while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --config) require_value "$@"; config=$2; shift 2 ;;
    --workdir) require_value "$@"; workdir=$2; shift 2 ;;
    --gpus) require_value "$@"; gpus=$2; shift 2 ;;
    --mem-fraction) require_value "$@"; mem_fraction=$2; shift 2 ;;
    --install) install=1; shift ;;
    --) shift; extra_args=("$@"); break ;;
    *) die "unknown option '$1'" ;;
  esac
done

if [[ -n $gpus && ! $gpus =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  die "--gpus takes GPU indices separated by commas, e.g. 0,1; got '$gpus'"
fi
if [[ ! $mem_fraction =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]]; then
  die "--mem-fraction must be a number in (0, 1], got '$mem_fraction'"
fi

if ((install)); then
  run "$python" -m pip install -c "$REPO_ROOT/constraints.txt" -e "$REPO_ROOT" "jax[cuda12]"
  if [[ -z $config && -z $workdir && ${#extra_args[@]} -eq 0 ]]; then
    exit 0
  fi
fi
require_option --config "$config" "e.g. configs/neti.py:sd15"
require_option --workdir "$workdir" "e.g. runs/cat"

environment=("XLA_PYTHON_CLIENT_MEM_FRACTION=$mem_fraction")
if [[ -n $gpus ]]; then
  environment=("CUDA_VISIBLE_DEVICES=$gpus" "${environment[@]}")
fi
run env "${environment[@]}" "$python" -m spacetime_jax.main "--config=$config" \
  "--workdir=$workdir" ${extra_args[@]+"${extra_args[@]}"}
