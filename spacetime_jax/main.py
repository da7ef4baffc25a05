"""Command-line entry: `python -m spacetime_jax.main --config=configs/X.py[:variant] --workdir=W`.

Dispatches on `config.method`. Bad input a person can fix ends the run with one line on
stderr naming the problem and exit status 2; nothing already written is removed.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from spacetime_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for this run's outputs and checkpoints.")


def _jobs():
    # Imported lazily: each job pulls in its own method's modules.
    from spacetime_jax.pipelines import sample_job
    return {"sample": sample_job.run}


def run(config, workdir: str) -> None:
    jobs = _jobs()
    if config.method not in jobs:
        raise UserError(f"config.method={config.method!r} is unknown; known: {sorted(jobs)}")
    jobs[config.method](config, workdir)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or not _WORKDIR.value:
        print("error: --config and --workdir are required", file=sys.stderr)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
