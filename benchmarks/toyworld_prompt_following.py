"""How often the toy-world model draws what the prompt says, measured from pixels.

  python benchmarks/toyworld_prompt_following.py [--model builtin:toyworld] [--num 64]
      [--out benchmarks/out]

Each of --num seeds gets a random prompt in the world's own words ("a photo of a small red
star on a green background": a plain object of any shape, size and color, a plain background of
another color); every image is scored from its pixels (toyworld/pretrain.py's
prompt_following): the background color on the border and the object color among the other
pixels, by the nearest-palette-color vote of toyworld/measure.py (chance 1/8 each); the shape,
the world shape whose templates best match the object's silhouette (chance 1/9); the size, the
world size whose area of the prompted shape is nearest (chance 1/3). Printed per guidance
scale (1.0 = no classifier-free guidance), with the shapes most often confused; a grid of the
first images, a person can look at, goes to --out (default benchmarks/out/, never the current
folder) as toyworld_prompt_following.png. The same measures on fresh renders of the prompts
are printed first: the measures' own ceiling. Targets for the shipped model at guidance 4:
background >= 0.95, color >= 0.85, shape >= 0.70, size >= 0.70.

Then the one-step denoising probe (toyworld/denoising.py) on --denoised held-out renders
(world seed 99): the outline IoU and shape read back after noising to t and one U-Net step,
which ranks models (short trials included) that all draw shapes near chance.
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np

from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import load_stable_diffusion
from spacetime_jax.pipelines.text_to_image import text_to_image
from spacetime_jax.toyworld import world
from spacetime_jax.toyworld.denoising import one_step_denoising
from spacetime_jax.toyworld.fidelity import read_shape
from spacetime_jax.toyworld.pretrain import (HELD_OUT_WORLD_SEED, ScoredPrompt,
                                             prompt_following, scored_prompts)
from spacetime_jax.toyworld.render import render
from spacetime_jax.toyworld.scene import Background, Scene
from spacetime_jax.visualize import save_grid

SEED_OFFSET = 10_000  # away from the seeds of the pretraining's own validation
GRID_COLUMNS = 8
GRID_FILE = "toyworld_prompt_following.png"
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


COLUMNS = ("background", "color", "shape", "size")


def score(images: np.ndarray, prompts: list[ScoredPrompt]) -> dict:
    hits = prompt_following(images, prompts)
    confusions = collections.Counter(
        (p.shape, read_shape(image)) for image, p, hit in zip(images, prompts, hits["shape"])
        if not hit)
    return {**{name: float(hits[name].mean()) for name in COLUMNS},
            "all": float(np.logical_and.reduce([hits[name] for name in COLUMNS]).mean()),
            "confusions": confusions.most_common(3)}


def renders(prompts: list[ScoredPrompt]) -> np.ndarray:
    """Each prompt drawn by the world itself, centered and upright: the measures' ceiling."""
    return np.stack([render(Scene(p.shape, p.color, p.size, (0.5, 0.5),
                                  Background("plain", p.background)))[0] for p in prompts])


def print_row(label: str, s: dict, seconds: float) -> None:
    confused = ", ".join(f"{a}->{b}: {n}" for (a, b), n in s["confusions"]) or "none"
    print(f"{label:>8} " + " ".join(f"{s[name]:>10.3f}" for name in COLUMNS)
          + f" {s['all']:>6.3f} {seconds:8.3f}  {confused}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:toyworld")
    parser.add_argument("--num", type=int, default=64, help="seeds (one prompt each); >= 50")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--denoised", type=int, default=256,
                        help="held-out renders for the one-step denoising probe; 0: skip it")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help=f"folder for {GRID_FILE} (the first images at the last guidance "
                             "scale)")
    args = parser.parse_args()

    sd = load_stable_diffusion(resolve_builtin(args.model))
    prompts = scored_prompts(args.num)
    seeds = [SEED_OFFSET + i for i in range(args.num)]
    print(f"model {args.model}; {args.num} seeds, {args.steps} {args.sampler} steps; chance: "
          "background 1/8, color 1/8, shape 1/9, size 1/3")
    print(f"{'guidance':>8} " + " ".join(f"{name:>10}" for name in COLUMNS)
          + f" {'all':>6} {'s/image':>8}  most confused shapes (prompted -> read: count)")
    print_row("renders", score(renders(prompts), prompts), 0.0)
    for guidance in args.guidance:
        start = time.perf_counter()
        images = text_to_image(sd, [p.prompt for p in prompts], seeds, num_steps=args.steps,
                               guidance_scale=guidance, method=args.sampler)
        print_row(f"{guidance:.1f}", score(images, prompts),
                  (time.perf_counter() - start) / args.num)
    cols = min(GRID_COLUMNS, args.num)
    rows = min(4, args.num // cols)
    grid = save_grid(Path(args.out) / GRID_FILE, images[:rows * cols], rows=rows, cols=cols,
                     title=f"{args.model}, guidance {args.guidance[-1]:g}: the first "
                           f"{rows * cols} scored prompts, seeds {seeds[0]}.."
                           f"{seeds[rows * cols - 1]} (row by row)")
    print(f"grid of the first {rows * cols} images (guidance {args.guidance[-1]}) -> {grid}")
    if args.denoised:
        print(f"one step of denoising, {args.denoised} held-out renders (world seed "
              f"{HELD_OUT_WORLD_SEED}; t=0: the VAE alone)")
        print(f"{'t':>5} {'IoU':>7} {'shape':>7} {'latent rmse':>12}")
        held_out = world.generate(HELD_OUT_WORLD_SEED, args.denoised,
                                    size=sd.unet.config.sample_size
                                    * sd.vae_config.downsample_factor)
        for d in one_step_denoising(sd, held_out):
            print(f"{d.timestep:>5} {d.iou:>7.3f} {d.shape_accuracy:>7.3f} "
                  f"{d.latent_rmse:>12.3f}")


if __name__ == "__main__":
    main()
