"""The `sample` job: prompts x seeds from a plain model -> grid.png and one PNG per image."""
from __future__ import annotations

import time
from pathlib import Path

import jax.numpy as jnp
from PIL import Image

from spacetime_jax.diffusion.samplers import METHODS
from spacetime_jax.errors import UserError
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import load_stable_diffusion, model_summary
from spacetime_jax.pipelines.text_to_image import text_to_image
from spacetime_jax.visualize import save_grid

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    if name not in DTYPES:
        raise UserError(f"compute_dtype={name!r} is unknown; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def run(config, workdir: str) -> None:
    s = config.sample
    if s.sampler not in METHODS:
        raise UserError(f"sample.sampler={s.sampler!r} is unknown; use one of {METHODS}")
    if not s.prompts or not s.seeds:
        raise UserError("sample.prompts and sample.seeds must each hold at least one entry")
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    sd = load_stable_diffusion(resolve_builtin(config.model), compute_dtype(config.compute_dtype))
    print(model_summary(sd), flush=True)
    prompts = [p for p in s.prompts for _ in s.seeds]
    seeds = [seed for _ in s.prompts for seed in s.seeds]
    start = time.perf_counter()
    images = text_to_image(sd, prompts, seeds, num_steps=s.steps,
                           guidance_scale=s.guidance_scale, method=s.sampler,
                           resolution=s.resolution or None)
    seconds = time.perf_counter() - start
    for index, (prompt, seed) in enumerate(zip(prompts, seeds)):
        Image.fromarray(images[index]).save(out / f"{index:03d}_seed{seed}.png")
    grid = save_grid(out / "grid.png", images, rows=len(s.prompts), cols=len(s.seeds),
                     row_labels=list(s.prompts), col_labels=[f"seed {x}" for x in s.seeds])
    print(f"{len(images)} images in {seconds:.1f} s (compilation included) -> {grid}")
