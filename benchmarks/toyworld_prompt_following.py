"""How often the toy-world model draws what the prompt says, measured from pixels.

  python benchmarks/toyworld_prompt_following.py [--model builtin:toyworld] [--num 64]
      [--out benchmarks/out]

Each of --num seeds gets a random prompt in the world's own words ("a photo of a red star on a
green background": a plain object, a plain background of another color); every image is scored
by the nearest-palette-color vote of toyworld/measure.py: the background color on the border,
the object color among the other pixels. With 8 colors, chance is 1/8. Printed per guidance
scale (1.0 = no classifier-free guidance), with the colors most often confused; a grid of the
first images, a person can look at, goes to --out (default benchmarks/out/, never the current
folder) as toyworld_prompt_following.png. Target for the shipped model: background color right
at least 80% of the time.
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
from spacetime_jax.toyworld.measure import measure_background_color, measure_object_color
from spacetime_jax.toyworld.pretrain import scored_prompts
from spacetime_jax.toyworld.scene import COLORS
from spacetime_jax.visualize import save_grid

SEED_OFFSET = 10_000  # away from the seeds of the pretraining's own validation
GRID_COLUMNS = 8
GRID_FILE = "toyworld_prompt_following.png"
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def score(images: np.ndarray, prompts: list[tuple[str, str, str]]) -> dict:
    background = [measure_background_color(img) for img in images]
    objects = [measure_object_color(img) for img in images]
    background_hits = [b == bg for b, (_, _, bg) in zip(background, prompts)]
    object_hits = [o == color for o, (_, color, _) in zip(objects, prompts)]
    confusions = collections.Counter(
        (bg, b) for b, (_, _, bg) in zip(background, prompts) if b != bg)
    return {"background": float(np.mean(background_hits)), "object": float(np.mean(object_hits)),
            "both": float(np.mean(np.logical_and(background_hits, object_hits))),
            "confusions": confusions.most_common(3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:toyworld")
    parser.add_argument("--num", type=int, default=64, help="seeds (one prompt each); >= 50")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help=f"folder for {GRID_FILE} (the first images at the last guidance "
                             "scale)")
    args = parser.parse_args()

    sd = load_stable_diffusion(resolve_builtin(args.model))
    prompts = scored_prompts(args.num)
    seeds = [SEED_OFFSET + i for i in range(args.num)]
    print(f"model {args.model}; {args.num} seeds, {args.steps} {args.sampler} steps; "
          f"chance {1 / len(COLORS):.3f}")
    print(f"{'guidance':>8} {'background':>10} {'object':>7} {'both':>6} {'s/image':>8}  "
          "most confused backgrounds (prompted -> drawn: count)")
    for guidance in args.guidance:
        start = time.perf_counter()
        images = text_to_image(sd, [p for p, _, _ in prompts], seeds, num_steps=args.steps,
                               guidance_scale=guidance, method=args.sampler)
        seconds = (time.perf_counter() - start) / args.num
        s = score(images, prompts)
        confused = ", ".join(f"{a}->{b}: {n}" for (a, b), n in s["confusions"]) or "none"
        print(f"{guidance:8.1f} {s['background']:10.3f} {s['object']:7.3f} {s['both']:6.3f} "
              f"{seconds:8.3f}  {confused}")
    cols = min(GRID_COLUMNS, args.num)
    rows = min(4, args.num // cols)
    grid = save_grid(Path(args.out) / GRID_FILE, images[:rows * cols], rows=rows, cols=cols,
                     title=f"{args.model}, guidance {args.guidance[-1]:g}: the first "
                           f"{rows * cols} scored prompts, seeds {seeds[0]}.."
                           f"{seeds[rows * cols - 1]} (row by row)")
    print(f"grid of the first {rows * cols} images (guidance {args.guidance[-1]}) -> {grid}")


if __name__ == "__main__":
    main()
