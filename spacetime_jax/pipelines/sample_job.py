"""The `sample` job: prompts x seeds from a plain model -> grid.png and one PNG per image.

Each prompt's seeds are one batch (one compiled call: every batch has the same shape), a
progress bar (or plain lines off a terminal) counts them; a NeTI concept's calls are one per
(seed, truncation)."""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
from etils import epath

from spacetime_jax.diffusion.samplers import METHODS
from spacetime_jax.errors import UserError
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import load_stable_diffusion, model_summary
from spacetime_jax.models.tokenizer import warn_unknown_words
from spacetime_jax.neti.concept import load_concept, prepare_text_encoder
from spacetime_jax.neti.mapper import check_truncation
from spacetime_jax.neti.sample import format_prompts, generate
from spacetime_jax.paths import as_path
from spacetime_jax.pipelines.text_to_image import text_to_image
from spacetime_jax.training.progress import track
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
    sd = load_stable_diffusion(resolve_builtin(config.model), compute_dtype(config.compute_dtype),
                               revision=config.model_revision, attention=config.attention)
    print(model_summary(sd), flush=True)
    warn_unknown_words(sd.tokenizer, s.prompts, "sample.prompts", config.model)
    seeds = list(s.seeds)
    start = time.perf_counter()
    images = np.concatenate([
        text_to_image(sd, [prompt] * len(seeds), seeds, num_steps=s.steps,
                      guidance_scale=s.guidance_scale, method=s.sampler,
                      resolution=s.resolution or None)
        for prompt in track(s.prompts, "sampling", unit="prompt")])
    seconds = time.perf_counter() - start
    for index, image in enumerate(images):
        save_png(out / f"{index:03d}_seed{seeds[index % len(seeds)]}.png", image)
    grid = save_grid(out / "grid.png", images, rows=len(s.prompts), cols=len(seeds),
                     row_labels=list(s.prompts), col_labels=[f"seed {x}" for x in seeds],
                     title=f"{as_path(config.model).name}: prompts x seeds "
                           f"{', '.join(map(str, seeds))}; {s.steps} {s.sampler} steps, "
                           f"guidance {s.guidance_scale:g}")
    print(f"{len(images)} images in {seconds:.1f} s (compilation included) -> {grid}")


def concept_model(config, concept) -> tuple[str, str]:
    """(model, revision) to sample `concept` with: the config's model, else the concept's
    base model at the revision it was trained on (unless model_revision says otherwise)."""
    if config.model:
        return config.model, config.model_revision
    trained_on = (concept.train_config or {}).get("model_revision", "")
    return concept.base_model, config.model_revision or trained_on


def run_concept(config, out: epath.Path) -> None:
    """A NeTI concept: for each seed, a grid of prompts (rows) x truncation indices (columns)."""
    s = config.sample
    concept = load_concept(config.concept)
    truncations = [None] + [int(t) for t in s.truncations]
    for t in truncations[1:]:
        check_truncation(t, concept.mapper_config.hidden_width)
    prompts = format_prompts(s.prompts, concept.placeholder)
    model, revision = concept_model(config, concept)
    sd = load_stable_diffusion(resolve_builtin(model), compute_dtype(config.compute_dtype),
                               revision=revision, attention=config.attention)
    print(model_summary(sd), flush=True)
    warn_unknown_words(sd.tokenizer, s.prompts, "sample.prompts", model)
    text = prepare_text_encoder(sd.text_encoder, sd.tokenizer, sd.text_params,
                                [concept.placeholder], [concept.super_category])
    start = time.perf_counter()
    drawn = {}
    for seed, t in track([(seed, t) for seed in s.seeds for t in truncations], "sampling",
                         unit="call"):
        drawn[seed, t] = generate(sd, text, concept, text.placeholder_ids[0],
                                  concept.target_norm, prompts, [seed] * len(prompts),
                                  truncation=t, num_steps=s.steps,
                                  guidance_scale=s.guidance_scale, method=s.sampler)
    for seed in s.seeds:
        for row in range(len(prompts)):
            for t in truncations:
                name = f"p{row:02d}_seed{seed}_trunc{'none' if t is None else t}.png"
                save_png(out / name, drawn[seed, t][row])
        grid = np.stack([drawn[seed, t][row] for row in range(len(prompts))
                         for t in truncations])
        save_grid(out / f"grid_seed{seed}.png", grid, rows=len(prompts), cols=len(truncations),
                  row_labels=prompts,
                  col_labels=["full" if t is None else f"T={t}" for t in truncations],
                  title=f"{concept.placeholder}, seed {seed}: prompts x truncation "
                        "(full, then smaller: more editable, less faithful)")
    seconds = time.perf_counter() - start
    print(f"{len(prompts) * len(truncations) * len(s.seeds)} images of {concept.placeholder} in "
          f"{seconds:.1f} s (compilation included) -> {out}/grid_seed*.png")
