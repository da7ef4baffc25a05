"""How well the toy-world model's VAE keeps the world's outlines, on held-out renders.

  python benchmarks/toyworld_vae.py [--model builtin:toyworld] [--num 256] [--out benchmarks/out]

Renders --num scenes of the pretraining world (seed 99: images no stage trained on) and --num
scenes of every held-out shape (toyworld/shapes.py's HELD_OUT_SHAPES and BENCHMARK_SHAPES, in
the world's colors, textures, sizes and backgrounds: outlines the VAE never saw), sends each
through the VAE (encode, posterior mean, decode) and prints, per group: the L1 error (images
in [-1, 1], the training loss's units), the silhouette IoU of the object read back from the
reconstruction against the rendered mask (mean, 5th percentile, min; toyworld/fidelity.py's
object mask), and the hot-spot ratio of the background error map (each pixel's error over the
images where it is background, objects' edges left out since they crowd the middle of the
pictures; the largest 8x8-pixel cell's mean over the mean of all cells: an artifact at a fixed
place shows as a ratio well above 1). Targets: IoU >= 0.90, with the held-out shapes, and no
hot spot. Writes toyworld_vae.png under --out (inputs above their reconstructions, and each
group's error maps, all pixels and background only, brightest = largest).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import format_table
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import load_vae
from spacetime_jax.toyworld import world
from spacetime_jax.toyworld.pretrain_vae import (error_map, make_reconstruct,
                                                 reconstruction_report)
from spacetime_jax.toyworld.render import render
from spacetime_jax.toyworld.shapes import BENCHMARK_SHAPES, HELD_OUT_SHAPES
from spacetime_jax.visualize import image_grid, save_png

DEFAULT_OUT = Path(__file__).resolve().parent / "out"
FILE = "toyworld_vae.png"
WORLD_SEED = 99  # the pretraining set is seed 0
SHOWN = 8  # images per group in the picture


def held_out_shape_scenes(num: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """num world scenes with each scene's shape replaced by a held-out one (in turn)."""
    shapes = list(HELD_OUT_SHAPES) + list(BENCHMARK_SHAPES)
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(num):
        scene = world.sample_scene(rng)
        scene = dataclasses.replace(scene, shape=shapes[i % len(shapes)])
        image, mask = render(scene, size)
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def error_picture(errors: np.ndarray) -> np.ndarray:
    """An error map as a grey uint8 image, scaled so that its largest value is white."""
    grey = np.uint8(np.round(255 * errors / max(float(errors.max()), 1e-8)))
    return np.repeat(grey[..., None], 3, axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:toyworld")
    parser.add_argument("--num", type=int, default=256, help="images per group")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"folder for {FILE}")
    args = parser.parse_args()
    if args.num < SHOWN:
        parser.error(f"--num must be at least {SHOWN}")

    model_dir = Path(resolve_builtin(args.model))
    vae, params, config = load_vae(model_dir / "vae")
    size = config.sample_size
    reconstruct = make_reconstruct(vae)
    examples = world.generate(WORLD_SEED, args.num, size=size)
    groups = {"pretraining shapes": (examples.images, examples.masks),
              "held-out shapes": held_out_shape_scenes(args.num, WORLD_SEED, size)}
    rows, tiles, maps = [], [], []
    for name, (images, masks) in groups.items():
        reconstructions = reconstruct(params, images)
        report = reconstruction_report(images, masks, reconstructions)
        rows.append([name, str(report["images"]), f"{report['l1']:.4f}",
                     f"{report['silhouette_iou']:.3f}", f"{report['silhouette_iou_p5']:.3f}",
                     f"{report['silhouette_iou_min']:.3f}", f"{report['hot_spot_ratio']:.2f}"])
        tiles += [images[:SHOWN], reconstructions[:SHOWN]]
        maps += [error_picture(error_map(images, reconstructions)),
                 error_picture(error_map(images, reconstructions, masks))]
    side = size // config.downsample_factor
    print(f"model {args.model}: VAE {size}x{size}x3 <-> {side}x{side}x{config.latent_channels}, "
          f"held-out renders (seed {WORLD_SEED})")
    print(format_table(["images", "n", "L1", "IoU mean", "IoU p5", "IoU min", "hot spot"], rows))
    grid = image_grid(np.concatenate(tiles), rows=len(tiles), cols=SHOWN,
                      row_labels=[f"{name}: {kind}" for name in groups
                                  for kind in ("renders", "reconstructions")],
                      title=f"{args.model} VAE: held-out renders and their reconstructions")
    error_grid = image_grid(np.stack(maps), rows=1, cols=len(maps),
                            col_labels=[f"{kind}, {name}" for name in groups
                                        for kind in ("mean error", "background error")])
    picture = np.zeros((grid.height + error_grid.height, max(grid.width, error_grid.width), 3),
                       np.uint8) + 255
    picture[:grid.height, :grid.width] = np.asarray(grid)
    picture[grid.height:, :error_grid.width] = np.asarray(error_grid)
    print(f"renders, reconstructions and error maps -> {save_png(Path(args.out) / FILE, picture)}")


if __name__ == "__main__":
    main()
