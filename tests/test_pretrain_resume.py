"""A pretraining stage resumes mid-stage. The minibatch order from a start step continues the
uninterrupted order; the VAE stage at toy sizes (in process), killed after a checkpoint and run
again on its workdir, ends with bitwise the params, held-out metrics and logged losses of an
uninterrupted run (the same batches and noise for the steps after the checkpoint); another
config on that workdir is refused before any work."""
from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import pytest

from spacetime_jax.errors import UserError
from spacetime_jax.toyworld.pretrain_vae import train_vae
from spacetime_jax.training.batches import minibatch_indices
from spacetime_jax.training.checkpoint import checkpoint_dir

STEPS, CHECKPOINT_EVERY, KILLED_AT = 10, 5, 7
# 20 images: 2 held out, 18 train in 4 batches of 4 per epoch, so the resume from step 5 starts
# in the second epoch's second batch.
IMAGES = 20


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """configs/toyworld_pretrain.py's vae fields at toy widths (16 px images, a progress line
    a step)."""
    return ml_collections.ConfigDict({**dict(
        channels=(8, 8), layers_per_block=1, norm_num_groups=4, batch_size=4, steps=STEPS,
        learning_rate=1e-3, warmup_steps=2, weight_decay=0.0, kl_weight=1e-6,
        center_latents=False, seed=0, checkpoint_every=CHECKPOINT_EVERY), **overrides})


class Killed(Exception):
    """Stands in for a kill: the process dies after a checkpoint, its later steps lost."""


def killed_when_logging(step: int):
    def log(line: str) -> None:
        if line.startswith(f"vae: step {step}/"):
            raise Killed
    return log


def logged_losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in records}) == len(records)
    return {r["step"]: r["loss"] for r in records}


@pytest.mark.parametrize("start", [0, 2, 3, 7])
def test_minibatches_from_a_start_continue_the_uninterrupted_order(start):
    uninterrupted = minibatch_indices(10, 3, seed=7)  # 3 batches an epoch
    expected = [next(uninterrupted) for _ in range(start + 4)][start:]
    resumed = minibatch_indices(10, 3, seed=7, start=start)
    np.testing.assert_array_equal([next(resumed) for _ in range(4)], expected)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    images = np.random.default_rng(0).integers(0, 256, (IMAGES, 16, 16, 3), dtype=np.uint8)
    masks = np.zeros(images.shape[:3], bool)
    masks[:, 4:12, 4:12] = True
    straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    reference = train_vae(images, masks, tiny_config(), straight, log=lambda line: None)
    with pytest.raises(Killed):
        train_vae(images, masks, tiny_config(), resumed, log=killed_when_logging(KILLED_AT))
    saved_before_rerun = sorted(p.name for p in checkpoint_dir(resumed).iterdir())
    lines = []
    result = train_vae(images, masks, tiny_config(), resumed, log=lines.append)
    return dict(images=images, masks=masks, straight=straight, resumed=resumed, reference=reference,
                result=result, saved_before_rerun=saved_before_rerun, lines=lines)


def test_a_killed_stage_resumes_to_the_params_of_an_uninterrupted_run(runs):
    assert runs["saved_before_rerun"] == [str(CHECKPOINT_EVERY)]
    assert f"vae: resumed from step {CHECKPOINT_EVERY} in {runs['resumed']}" in runs["lines"]
    reference, result = runs["reference"], runs["result"]
    reference_leaves, treedef = jax.tree.flatten(reference.params)
    result_leaves, result_treedef = jax.tree.flatten(result.params)
    assert treedef == result_treedef
    for expected, actual in zip(reference_leaves, result_leaves):
        np.testing.assert_array_equal(actual, expected)
    # Held-out metrics before (of the initial params, also on a resume) and after, the final
    # loss and the scaling factor drawn from the trained params: all equal.
    assert result._replace(params=None, train_seconds=0) == \
        reference._replace(params=None, train_seconds=0)
    # Steps 6..10 ran twice in the resumed workdir (the kill lost 6 and 7): each is logged once,
    # with the loss of the uninterrupted run (the same batch, noise and params).
    assert logged_losses(runs["resumed"]) == logged_losses(runs["straight"])
    assert sorted(logged_losses(runs["resumed"])) == list(range(1, STEPS + 1))


def test_another_config_on_a_checkpointed_workdir_is_refused(runs):
    with pytest.raises(UserError, match=r"differs in: vae\.learning_rate\)"):
        train_vae(runs["images"], runs["masks"], tiny_config(learning_rate=2e-3), runs["resumed"],
                  log=lambda line: None)
