"""The training loop of a toy-world pretraining stage (CLIP, VAE, U-Net): training/loop.py's,
with the stage's name on its lines and its config section as the checkpoints' config."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import ml_collections

from spacetime_jax.paths import PathLike
from spacetime_jax.training.checkpoint import check_compatible
from spacetime_jax.training.loop import LoopSettings, TrainingLoop


def stage_loop(stage: str, workdir: PathLike, config: ml_collections.ConfigDict,
               data: Mapping[str, Any], log_lines: int,
               log: Callable[[str], Any]) -> TrainingLoop:
    """The loop of pretraining stage `stage` (its config section `config`: steps,
    checkpoint_every, learning_rate) in workdir: about `log_lines` progress lines, each
    prefixed by the stage's name, and checkpoints of the run that `config` and `data` (facts of
    what it trains on, e.g. the number of examples) define. UserError when workdir holds
    checkpoints of another run: only the checkpoint cadence may change on a resume."""
    config_dict = {stage: config.to_dict(), "data": dict(data)}
    check_compatible(workdir, config_dict, allowed_to_differ=(f"{stage}.checkpoint_every",))
    settings = LoopSettings(steps=config.steps, log_every=max(1, config.steps // log_lines),
                            checkpoint_every=config.checkpoint_every)
    return TrainingLoop(workdir, settings, config_dict, log=lambda line: log(f"{stage}: {line}"),
                        nonfinite_hint=f"Lower {stage}.learning_rate")
