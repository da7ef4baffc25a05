"""The `sample` job: prompts x seeds from a plain model -> grid.png and one PNG per image."""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
from etils import epath

from spacetime_jax.diffusion.samplers import METHODS
from spacetime_jax.errors import UserError
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import load_stable_diffusion, model_summary
from spacetime_jax.neti.concept import load_concept, prepare_text_encoder
from spacetime_jax.neti.mapper import check_truncation
from spacetime_jax.neti.sample import format_prompts, generate
from spacetime_jax.paths import as_path
from spacetime_jax.pipelines.text_to_image import text_to_image
from spacetime_jax.visualize import save_grid, save_png

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
    out = as_path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    if config.concept:
        return run_concept(config, out)
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
        save_png(out / f"{index:03d}_seed{seed}.png", images[index])
    grid = save_grid(out / "grid.png", images, rows=len(s.prompts), cols=len(s.seeds),
                     row_labels=list(s.prompts), col_labels=[f"seed {x}" for x in s.seeds])
    print(f"{len(images)} images in {seconds:.1f} s (compilation included) -> {grid}")


def run_concept(config, out: epath.Path) -> None:
    """A NeTI concept: for each seed, a grid of prompts (rows) x truncation indices (columns)."""
    s = config.sample
    concept = load_concept(config.concept)
    truncations = [None] + [int(t) for t in s.truncations]
    for t in truncations[1:]:
        check_truncation(t, concept.mapper_config.hidden_width)
    prompts = format_prompts(s.prompts, concept.placeholder)
    sd = load_stable_diffusion(resolve_builtin(config.model or concept.base_model),
                               compute_dtype(config.compute_dtype))
    print(model_summary(sd), flush=True)
    text = prepare_text_encoder(sd.text_encoder, sd.tokenizer, sd.text_params,
                                [concept.placeholder], [concept.super_category])
    start = time.perf_counter()
    for seed in s.seeds:
        columns = [generate(sd, text, concept, text.placeholder_ids[0], concept.target_norm,
                            prompts, [seed] * len(prompts), truncation=t, num_steps=s.steps,
                            guidance_scale=s.guidance_scale, method=s.sampler)
                   for t in truncations]
        for row, prompt in enumerate(prompts):
            for t, images in zip(truncations, columns):
                name = f"p{row:02d}_seed{seed}_trunc{'none' if t is None else t}.png"
                save_png(out / name, images[row])
        grid = np.stack([columns[c][r] for r in range(len(prompts))
                         for c in range(len(truncations))])
        save_grid(out / f"grid_seed{seed}.png", grid, rows=len(prompts), cols=len(truncations),
                  row_labels=list(s.prompts),
                  col_labels=["full" if t is None else f"T={t}" for t in truncations])
    seconds = time.perf_counter() - start
    print(f"{len(prompts) * len(truncations) * len(s.seeds)} images of {concept.placeholder} in "
          f"{seconds:.1f} s (compilation included) -> {out}/grid_seed*.png")
