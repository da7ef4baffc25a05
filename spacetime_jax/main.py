"""Command-line entry: `python -m spacetime_jax.main --config=configs/X.py[:variant] --workdir=W`.

Dispatches on `config.method`. Bad input a person can fix ends the run with one line on
stderr naming the problem and exit status 2; nothing already written is removed.
"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from spacetime_jax.errors import UserError, exit_with
from spacetime_jax.paths import resolve, resolve_config_paths

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for this run's outputs and checkpoints.")


def _jobs():
    # Imported lazily: each job pulls in its own method's modules.
    from spacetime_jax.elite import personalize as elite_personalize
    from spacetime_jax.elite import train as elite_train
    from spacetime_jax.neti import train as neti_train
    from spacetime_jax.pipelines import sample_job
    from spacetime_jax.toyworld import pretrain as toyworld_pretrain
    return {"sample": sample_job.run, "neti": neti_train.run, "elite": elite_train.run,
            "elite_personalize": elite_personalize.run,
            "toyworld_pretrain": toyworld_pretrain.run}


def enable_compilation_cache() -> None:
    """Persistent XLA cache: a resumed or repeated run does not pay the compile again."""
    import jax

    from spacetime_jax.models.builtin import cache_dir
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run(config, workdir: str) -> None:
    """Joins the other processes (if any), resolves every path once, checks that all
    processes share the workdir, then runs the job."""
    jobs = _jobs()
    if config.method not in jobs:
        raise UserError(f"config.method={config.method!r} is unknown; known: {sorted(jobs)}")
    from spacetime_jax.parallel.mesh import maybe_initialize_distributed
    from spacetime_jax.parallel.multihost import check_shared_workdir
    maybe_initialize_distributed(config.get("distributed"))
    enable_compilation_cache()
    workdir = resolve(workdir)
    resolve_config_paths(config)
    check_shared_workdir(workdir)
    jobs[config.method](config, workdir)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config is None or not _WORKDIR.value:
        exit_with("--config and --workdir are required")
    try:
        config.method  # a config file that failed to load raises on first use
    except OSError as err:
        exit_with(str(err).strip().splitlines()[-1].strip())
    try:
        run(config, _WORKDIR.value)
    except UserError as err:
        exit_with(str(err))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with config errors (a bad file, variant or key) as one line and exit 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # ml_collections raises many types while applying overrides
        exit_with(_describe_flag_error(err, argv))


def _describe_flag_error(err: Exception, argv: list[str]) -> str:
    text = str(err)
    overrides = [a.split("=")[0][2:] for a in argv[1:] if a.startswith("--config.")]
    unknown = [o for o in overrides if any(f"'{part}'" in text for part in o.split(".")[1:])]
    if isinstance(err, (AttributeError, KeyError)):
        return (f"--{unknown[0] if unknown else 'config'}: no such key in the config (unknown "
                "keys are errors; see the config file for the keys it has)")
    # ml_collections wraps the config file's own exception, traceback and all: its last
    # line is the message a person needs.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"bad command line: {lines[-1] if lines else type(err).__name__}"


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
