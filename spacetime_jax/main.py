"""Command-line entry: `spacetime-jax --config=NAME[:variant] --workdir=W`, the same as
`python -m spacetime_jax.main --config=configs/NAME.py[:variant] --workdir=W`.

`--help` lists the built-in configs and their variants; `--print_config` prints the config
after the command line's overrides and exits. Dispatches on `config.method`. Bad input a
person can fix ends the run with one line on stderr naming the problem and exit status 2;
nothing already written is removed.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from spacetime_jax import cli
from spacetime_jax.errors import USER_ERROR_STATUS, UserError, exit_with
from spacetime_jax.paths import resolve, resolve_config_paths

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A built-in config NAME[:variant] (see --help) or a config file "
    "(configs/NAME.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for this run's outputs and checkpoints.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the config (after the "
                                  "--config.KEY=VALUE overrides) and exit without running.")


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
    if config is None or not (_WORKDIR.value or _PRINT_CONFIG.value):
        exit_with("--config and --workdir are required (--help lists the built-in configs)")
    try:
        config.method  # a config file that failed to load raises on first use
    except OSError as err:
        exit_with(str(err).strip().splitlines()[-1].strip())
    if _PRINT_CONFIG.value:
        print(cli.format_config(config, cli.config_source(sys.argv)))  # as typed
        return
    from spacetime_jax.training.checkpoint import CheckpointWriteError
    try:
        run(config, _WORKDIR.value)
    except CheckpointWriteError as err:
        # The failed save leaves orbax's sibling writes and tensorstore's callbacks behind on
        # their threads; whatever they print while the interpreter tears down would bury the
        # one line. Nothing is left to save: the newest complete checkpoint is on disk.
        print(f"error: {err}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(USER_ERROR_STATUS)
    except UserError as err:
        exit_with(str(err))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser after our --help and a built-in config name resolved to its file, with
    config errors (a bad file, variant or key) as one line and exit 2."""
    if any(arg in cli.HELP_FLAGS for arg in argv[1:]):
        print(cli.help_text())
        raise SystemExit(0)
    resolved = cli.resolve_config_name(argv)
    try:
        return flags.FLAGS(resolved)
    except Exception as err:  # ml_collections raises many types while applying overrides
        exit_with(_describe_flag_error(err, resolved, cli.config_source(argv)))


def _describe_flag_error(err: Exception, argv: list[str], source: str | None) -> str:
    unknown = cli.unknown_key_error(argv, source) if source else None
    if unknown:
        return unknown
    # ml_collections wraps the config file's own exception, traceback and all: its last
    # line is the message a person needs.
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    if "Error whilst parsing config file" in text:  # get_config raised: a wrong variant, say
        return f"--config={source}: {last.split(': ', 1)[-1]}"
    return f"bad command line: {last}"


def console() -> None:
    """The `spacetime-jax` console command (setup.py's entry point)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console()
