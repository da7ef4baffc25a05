"""Writes a toy-world object data set in OpenImages' layout, for ELITE's object-crop builder:

  python -m spacetime_jax.elite.toyworld_data data/toy_objects --train 2000 --test 200 --seed 0

train/ holds scenes of the pretraining world; test/ holds held-out scenes (held-out shapes and
two-tone textures: objects the toy model never saw) and a boxes.csv, so that both ways of
finding a box (from the CSV, from the mask) are used. One object per image; the layout is the
one elite/data.py reads.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from spacetime_jax.elite.data import BOX_COLUMNS, BOXES_CSV, ObjectCropsConfig, mask_box
from spacetime_jax.errors import UserError
from spacetime_jax.toyworld.render import render
from spacetime_jax.toyworld.scene import COLORS, TEXTURES, Scene
from spacetime_jax.toyworld.shapes import ALL_SHAPES, HELD_OUT_SHAPES
from spacetime_jax.toyworld.world import sample_background, sample_placement, sample_scene
from spacetime_jax.training.progress import track

# The ELITE reference's pixel settings are for photos about this many pixels on a side.
_REFERENCE_PHOTO_SIDE = 1024
_SPLIT_KEYS = {"train": 0, "test": 1}  # each split draws from its own generators
_BOX_ID = "0"  # one object per image


def toyworld_config(size: int = 128, crop_size: int = 64) -> ObjectCropsConfig:
    """The reference's filters with its pixel settings scaled from ~1024 px photos to `size`.
    Every toy object (radius 0.14..0.30 of the side) is large enough; a few elongated
    held-out ones (bolts, arrows; ~5%) fall outside the aspect range, as they would in
    OpenImages."""
    scale = size / _REFERENCE_PHOTO_SIDE
    defaults = ObjectCropsConfig()
    return ObjectCropsConfig(crop_size=crop_size, min_side=round(defaults.min_side * scale),
                             pad_min=round(defaults.pad_min * scale),
                             pad_max=round(defaults.pad_max * scale))


def sample_held_out_scene(rng: np.random.Generator) -> Scene:
    """A scene pretraining never shows: a held-out shape (half of the time) or a pretraining
    shape in a two-tone texture, which held-out shapes may wear too."""
    if rng.random() < 0.5:
        shape = str(rng.choice(list(HELD_OUT_SHAPES)))
        two_tone = bool(rng.integers(2))
    else:
        shape = str(rng.choice(list(ALL_SHAPES)))
        two_tone = True
    color = str(rng.choice(list(COLORS)))
    texture, accent = "plain", None
    if two_tone:
        texture = str(rng.choice([t for t in TEXTURES if t != "plain"]))
        accent = str(rng.choice([c for c in COLORS if c != color]))
    colors = (color,) if accent is None else (color, accent)
    size, position, rotation = sample_placement(rng)
    return Scene(shape, color, size, position, sample_background(rng, exclude=colors),
                 texture=texture, accent=accent, rotation=rotation)


def _scene(split: str, seed: int, index: int) -> Scene:
    rng = np.random.default_rng([seed, _SPLIT_KEYS[split], index])
    return sample_scene(rng) if split == "train" else sample_held_out_scene(rng)


def _write_split(split_dir: Path, split: str, n: int, seed: int, size: int) -> None:
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "masks").mkdir(exist_ok=True)
    rows = []
    for index in track(range(n), f"writing {split} objects", unit="obj"):
        scene = _scene(split, seed, index)
        image, mask = render(scene, size)
        image_id = f"toy{split}{seed}x{index:06d}"  # OpenImages ImageIDs hold no underscore
        mask_name = f"{image_id}_{scene.shape}_{_BOX_ID}.png"
        Image.fromarray(image).save(split_dir / "images" / f"{image_id}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(split_dir / "masks" / mask_name)
        box = mask_box(mask)
        rows.append((mask_name, image_id, scene.shape, _BOX_ID, box.x0 / size, box.x1 / size,
                     box.y0 / size, box.y1 / size))
    if split == "test":
        with open(split_dir / BOXES_CSV, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(BOX_COLUMNS)
            writer.writerows(rows)


def write_toyworld_objects(out: str | Path, train: int, test: int, seed: int = 0,
                           size: int = 128) -> dict[str, int]:
    """Writes out/train (pretraining world) and out/test (held-out scenes, with boxes.csv);
    returns {split: objects written}. A split with 0 objects is not written."""
    if train < 0 or test < 0 or train + test == 0:
        raise ValueError(f"need train, test >= 0 and at least one object, got {train}, {test}")
    if seed < 0 or size < 16:
        raise ValueError(f"need seed >= 0 and size >= 16, got seed={seed}, size={size}")
    counts = {split: n for split, n in (("train", train), ("test", test)) if n > 0}
    for split in counts:
        split_dir = Path(out) / split
        if split_dir.exists() and any(split_dir.iterdir()):
            # Objects left from an earlier, larger run would silently join this one.
            raise UserError(f"{split_dir} already holds files; write into an empty folder")
    for split, n in counts.items():
        _write_split(Path(out) / split, split, n, seed, size)
    return counts


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write train/ and test/ into")
    parser.add_argument("--train", type=int, default=2000, help="pretraining-world objects")
    parser.add_argument("--test", type=int, default=200, help="held-out objects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    args = parser.parse_args(argv)
    try:
        counts = write_toyworld_objects(args.out, args.train, args.test, args.seed, args.size)
    except (ValueError, UserError) as err:
        parser.error(str(err))
    for split, n in counts.items():
        print(f"{Path(args.out) / split}: {n} objects")


if __name__ == "__main__":
    main()
