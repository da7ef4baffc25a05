"""Config values no run can use are refused with one line naming the key (the jobs call these
before loading anything; their command-line tests check the exit status)."""
import ml_collections
import pytest

from spacetime_jax.errors import UserError
from spacetime_jax.training.config_checks import check_training_config


def config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict({
        "train": {"steps": 10, "batch_size": 2, "grad_accum": 1, "log_every": 5,
                  "checkpoint_every": 5, "keep_checkpoints": 3, "learning_rate": 1e-3},
        "validation": {"every": 5, "steps": 20, "guidance_scale": 4.0, "sampler": "dpmpp_2m"}})
    c.update_from_flattened_dict(overrides)
    return c


def test_a_usable_config_passes():
    check_training_config(config())
    check_training_config(config(**{"validation.every": 0, "validation.sampler": "none"}))


@pytest.mark.parametrize("overrides, message", [
    ({"train.steps": 0}, "train.steps=0: it takes a whole number >= 1"),
    ({"train.steps": -5}, "train.steps=-5: it takes a whole number >= 1"),
    ({"train.grad_accum": 0}, "train.grad_accum=0"),
    ({"train.checkpoint_every": 0}, "train.checkpoint_every=0"),
    ({"train.learning_rate": 0.0}, "train.learning_rate=0.0: it takes a positive finite number"),
    ({"train.learning_rate": float("inf")}, "train.learning_rate=inf"),
    ({"validation.every": -1}, "validation.every=-1: it takes a whole number >= 0"),
    ({"validation.steps": 0}, "validation.steps=0"),
    ({"validation.sampler": "heun"}, "validation.sampler='heun' is unknown; use one of ddim"),
])
def test_each_unusable_value_is_named(overrides, message):
    with pytest.raises(UserError, match=None) as raised:
        check_training_config(config(**overrides))
    assert message in str(raised.value)
