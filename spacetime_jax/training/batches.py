"""Minibatch order for the pretraining stages: seeded, epoch by epoch."""
from __future__ import annotations

from typing import Iterator

import numpy as np


def minibatch_indices(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless minibatches of indices into n examples: each epoch a fresh seeded permutation,
    the ragged end dropped."""
    if n < batch_size:
        raise ValueError(f"{n} training examples are fewer than batch_size={batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]
