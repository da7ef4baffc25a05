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
