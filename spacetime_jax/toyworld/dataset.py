"""The toy world's fixed pretraining set: rendered once, cached in a folder, reused by every
stage and every rerun.

Rendering costs about 5 ms an image, so a set of tens of thousands is drawn by a few worker
processes (started with "spawn": forking a process that has initialized JAX is unsafe). Each
example depends only on (seed, index) (see world.py), so the set is the same however it is
split among workers.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from spacetime_jax.toyworld.world import generate
from spacetime_jax.training.progress import track

CHUNK = 500  # examples per worker task: large enough that a task outweighs its overhead


@dataclasses.dataclass(frozen=True)
class PretrainingSet:
    images: np.ndarray  # (N, size, size, 3) uint8
    masks: np.ndarray  # (N, size, size) bool, the object's pixels
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _render_chunk(task: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    seed, start, n, size = task
    examples = generate(seed, n, start=start, size=size)
    return examples.images, examples.masks, examples.captions


def render_pretraining_set(num_examples: int, seed: int, size: int = 64, processes: int = 2,
                           chunk: int = CHUNK) -> PretrainingSet:
    """Examples 0 .. num_examples - 1 of `seed`, rendered by `processes` worker processes
    (1: in this process), `chunk` examples a task; a progress bar (or plain lines) counts
    the images."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    tasks = [(seed, start, min(chunk, num_examples - start), size)
             for start in range(0, num_examples, chunk)]
    shown = lambda rendered: track(rendered, "rendering", total=num_examples, unit="img",
                                   size_of=lambda chunk: len(chunk[2]))
    if processes <= 1 or len(tasks) == 1:
        chunks = list(shown(map(_render_chunk, tasks)))
    else:
        with multiprocessing.get_context("spawn").Pool(min(processes, len(tasks))) as pool:
            chunks = list(shown(pool.imap(_render_chunk, tasks)))
    images, masks, captions = zip(*chunks)
    return PretrainingSet(np.concatenate(images), np.concatenate(masks),
                          [c for chunk in captions for c in chunk])


def cache_paths(folder: str | Path, num_examples: int, seed: int,
                size: int) -> tuple[Path, Path]:
    """(arrays .npz, captions .json) of one set inside `folder`."""
    stem = f"toyworld_seed{seed}_n{num_examples}_{size}px"
    return Path(folder) / f"{stem}.npz", Path(folder) / f"{stem}.captions.json"


def _write_atomically(path: Path, write: Callable[[Any], None], mode: str) -> None:
    # An interrupted write leaves no file under the final name, so a half-written cache is
    # never mistaken for a finished one.
    partial = path.with_name(path.name + ".partial")
    with open(partial, mode) as f:
        write(f)
    os.replace(partial, path)


def save_pretraining_set(data: PretrainingSet, arrays_path: Path, captions_path: Path) -> None:
    arrays_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(captions_path, lambda f: json.dump(data.captions, f), "w")
    # Masks are bits: 8x smaller packed. The arrays file is written last; it marks the cache
    # complete.
    _write_atomically(arrays_path, lambda f: np.savez_compressed(
        f, images=data.images, packed_masks=np.packbits(data.masks, axis=-1),
        mask_width=np.int64(data.masks.shape[-1])), "wb")


def load_pretraining_set(arrays_path: Path, captions_path: Path) -> PretrainingSet:
    with np.load(arrays_path) as arrays:
        images = arrays["images"]
        masks = np.unpackbits(arrays["packed_masks"], axis=-1,
                              count=int(arrays["mask_width"])).astype(bool)
    captions = json.loads(captions_path.read_text())
    if len(captions) != len(images):
        raise ValueError(f"{captions_path} holds {len(captions)} captions for "
                         f"{len(images)} images in {arrays_path}")
    return PretrainingSet(images, masks, captions)


def load_or_render(folder: str | Path, num_examples: int, seed: int, size: int = 64,
                   processes: int = 2, log: Callable[[str], Any] = print) -> PretrainingSet:
    """The cached set in `folder` when there is one, else rendered now and cached there."""
    arrays_path, captions_path = cache_paths(folder, num_examples, seed, size)
    if arrays_path.is_file() and captions_path.is_file():
        log(f"dataset: {num_examples} examples from the cache {arrays_path}")
        return load_pretraining_set(arrays_path, captions_path)
    log(f"dataset: rendering {num_examples} examples of seed {seed} with {processes} "
        "processes")
    start = time.perf_counter()
    data = render_pretraining_set(num_examples, seed, size, processes)
    save_pretraining_set(data, arrays_path, captions_path)
    log(f"dataset: rendered and cached in {time.perf_counter() - start:.0f}s")
    return data
