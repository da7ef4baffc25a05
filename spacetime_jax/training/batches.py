"""Minibatch order for the pretraining stages: seeded, epoch by epoch, resumable at any
step."""
from __future__ import annotations

from typing import Iterator

import numpy as np


def minibatch_indices(n: int, batch_size: int, seed: int, start: int = 0
                      ) -> Iterator[np.ndarray]:
    """Endless minibatches of indices into n examples: each epoch a fresh seeded permutation,
    the ragged end dropped. `start` skips the first `start` batches: a run resumed after step
    `start` draws what an uninterrupted run draws from there."""
    if n < batch_size:
        raise ValueError(f"{n} training examples are fewer than batch_size={batch_size}")
    per_epoch = n // batch_size
    epoch, first = divmod(start, per_epoch)
    rng = np.random.default_rng(seed)
    for _ in range(epoch):  # the permutations of the skipped epochs advance the generator
        rng.permutation(n)
    while True:
        order = rng.permutation(n)
        for batch in range(first, per_epoch):
            yield order[batch * batch_size:(batch + 1) * batch_size]
        first = 0


def grouped_minibatch_indices(groups: np.ndarray, batch_size: int, groups_per_batch: int,
                              seed: int, start: int = 0) -> Iterator[np.ndarray]:
    """Endless minibatches of indices, each `groups_per_batch` distinct groups (labels in
    `groups`) with batch_size // groups_per_batch examples of each: in-batch negatives that
    share what the group shares. Batch `step` comes from its own seeded generator, so a run
    resumed at `start` draws what an uninterrupted run draws from there."""
    groups = np.asarray(groups)
    if groups_per_batch < 1 or batch_size % groups_per_batch:
        raise ValueError(f"batch_size={batch_size} is not a multiple of "
                         f"groups_per_batch={groups_per_batch}")
    per_group = batch_size // groups_per_batch
    labels, counts = np.unique(groups, return_counts=True)
    members = [np.flatnonzero(groups == label) for label in labels[counts >= per_group]]
    if len(members) < groups_per_batch:
        raise ValueError(f"only {len(members)} groups have the {per_group} examples a batch "
                         f"takes of each; groups_per_batch={groups_per_batch}")
    step = start
    while True:
        rng = np.random.default_rng([seed, step])
        chosen = rng.choice(len(members), groups_per_batch, replace=False)
        yield np.concatenate([rng.choice(members[g], per_group, replace=False) for g in chosen])
        step += 1
