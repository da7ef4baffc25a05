"""The `neti` job: learn each concept's space-time mapper on a frozen Stable Diffusion.

Reads top to bottom: devices and mesh, the frozen model, the concepts (validated before any
compute), the data each step draws from, the mappers and optimizer, restore or init, the
compiled step, the loop (progress, checkpoints, validation grids), the artifacts.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spacetime_jax.data.images import load_concept_images
from spacetime_jax.data.latents import LatentMoments, concept_latent_cache
from spacetime_jax.data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES
from spacetime_jax.diffusion.schedules import ddpm_schedule
from spacetime_jax.errors import UserError
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import load_stable_diffusion, model_summary
from spacetime_jax.models.tokenizer import check_prompt_length, find_token_positions, tokenize
from spacetime_jax.neti.concept import Concept, prepare_text_encoder, save_concept
from spacetime_jax.neti.mapper import MapperConfig, build_mapper, init_mapper_variables
from spacetime_jax.neti.sample import format_prompts, generate
from spacetime_jax.neti.step import (ConceptData, StepStatics, TrainState, evaluation_loss,
                                     train_step)
from spacetime_jax.parallel import sharding
from spacetime_jax.parallel.mesh import (make_mesh, maybe_initialize_distributed,
                                         replicas_per_concept)
from spacetime_jax.pipelines.sample_job import compute_dtype
from spacetime_jax.training.checkpoint import Checkpointer, check_compatible
from spacetime_jax.training.progress import METRICS_FILE, Progress
from spacetime_jax.visualize import save_grid

TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
# Keys a resumed run may change without a new workdir.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "validation")


@dataclasses.dataclass(frozen=True)
class ConceptSpec:
    """One concept to learn, as the config names it."""
    name: str
    images: str
    placeholder: str
    super_category: str
    learnable_property: str = "object"


def concept_specs(config) -> list[ConceptSpec]:
    """The single concept of `config.concept` / `config.data` (batch runs list several)."""
    c = config.concept
    if c.learnable_property not in TEMPLATES:
        raise UserError(f"concept.learnable_property={c.learnable_property!r}: use 'object' or "
                        "'style'")
    if not config.data.images:
        raise UserError("data.images is not set: --config.data.images=FOLDER of the concept's "
                        "images")
    name = c.placeholder.strip("<>") or "concept"
    return [ConceptSpec(name, config.data.images, c.placeholder, c.super_category,
                        c.learnable_property)]


def mapper_config_from(config, sd) -> MapperConfig:
    m = config.mapper
    return MapperConfig(num_layers=sd.num_cross_attention_layers,
                        num_anchor_timesteps=m.num_anchor_timesteps,
                        num_frequencies=m.num_frequencies, sigma_t=m.sigma_t, sigma_l=m.sigma_l,
                        hidden_width=m.hidden_width, token_dim=sd.text_encoder.config.hidden_size,
                        use_bypass=m.use_bypass and m.kind == "neti",
                        nested_dropout=m.nested_dropout, nested_dropout_prob=m.nested_dropout_prob,
                        encoder=m.encoder)


def learning_rate(config, mesh) -> float:
    """The reference's scaling: base lr x batch x accumulation x the concept's replicas."""
    t = config.train
    if not t.scale_lr:
        return t.learning_rate
    return t.learning_rate * t.batch_size * t.grad_accum * replicas_per_concept(mesh)


def build_concept_data(specs, sd, tokenizer, placeholder_ids, target_norms, variables,
                       workdir: Path, resolution: int, seeds: list[int]) -> ConceptData:
    """Tokenized templates, cached latent moments and fixed mapper variables, stacked on K."""
    moments, counts, prompt_ids, positions = [], [], [], []
    for index, spec in enumerate(specs):
        images, _ = load_concept_images(spec.images, resolution)
        cache_dir = workdir / "cache" / spec.name
        cache_dir.mkdir(parents=True, exist_ok=True)
        moments.append(concept_latent_cache(cache_dir, sd.vae, sd.vae_params, images, sd.source))
        counts.append(2 * len(images))
        prompts = format_prompts(TEMPLATES[spec.learnable_property], spec.placeholder)
        for prompt in prompts:
            check_prompt_length(tokenizer, prompt)
        ids = tokenize(tokenizer, prompts)
        prompt_ids.append(ids)
        positions.append(find_token_positions(ids, placeholder_ids[index], prompts))
    rows = max(counts)
    pad = lambda a: np.concatenate([a, np.repeat(a[:1], rows - len(a), axis=0)])
    stacked = LatentMoments(np.stack([pad(np.asarray(m.mean)) for m in moments]),
                            np.stack([pad(np.asarray(m.logvar)) for m in moments]))
    return ConceptData(moments=stacked, num_rows=np.asarray(counts, np.int32),
                       prompt_ids=np.stack(prompt_ids), positions=np.stack(positions),
                       target_norms=np.asarray(target_norms, np.float32),
                       seeds=np.asarray(seeds, np.uint32),
                       encoding={k: v for k, v in variables.items() if k != "params"})


def truncate_metrics(workdir: Path, last_step: int) -> None:
    """Drops metric lines past the step a resumed run restarts from (no duplicates)."""
    path = workdir / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def concept_seed(train_seed: int, placeholder: str) -> int:
    """A concept's own seed (mapper init and every step's draws): the same concept trained
    alone or beside others, at any position of a batch, learns the same thing."""
    return (int(train_seed) * 1_000_003 + zlib.crc32(placeholder.encode())) % 2**32


@dataclasses.dataclass
class Session:
    """One run's concepts, data, frozen model and compiled-step ingredients, built once; the
    job, the tests and the quality benchmark all step through it."""
    specs: list
    concepts: list  # Concept metadata per spec (variables filled at the end)
    mapper_config: MapperConfig
    data: ConceptData
    frozen: Any  # (unet params, text params with the placeholder rows)
    schedule: Any
    statics: StepStatics
    optimizer: optax.GradientTransformation
    learning_rate: float
    initial_state: TrainState  # host arrays
    state_shardings: TrainState
    data_shardings: Any
    frozen_shardings: Any

    def put(self) -> None:
        """Places the data and frozen weights on the mesh (once, before stepping)."""
        self.data = sharding.shard_put(self.data, self.data_shardings)
        self.frozen = sharding.shard_put(self.frozen, self.frozen_shardings)

    def step_fn(self):
        """The train step, jitted with explicit shardings, the state donated."""
        return jax.jit(functools.partial(train_step, optimizer=self.optimizer,
                                         statics=self.statics),
                       in_shardings=(self.state_shardings, self.data_shardings,
                                     self.frozen_shardings, None),
                       out_shardings=(self.state_shardings, None), donate_argnums=(0,))

    @functools.cached_property
    def _evaluation_loss(self):
        return jax.jit(functools.partial(evaluation_loss, statics=self.statics))

    def evaluate(self, params, num_draws: int, seed: int = 0) -> np.ndarray:
        """(K,) mean loss of `params` over `num_draws` fixed draws of (example, noise,
        timestep) per concept, without nested dropout: the same draws for any params and any
        mapper kind, so losses of different runs compare on the same held-out pairs."""
        K = len(self.specs)
        per_call = self.statics.batch_size * self.statics.grad_accum
        calls = -(-num_draws // per_call)
        losses = [self._evaluation_loss(params, self.data, self.frozen, self.schedule,
                                        jnp.full((K,), 1_000_003 * seed + i, jnp.uint32))
                  for i in range(calls)]
        return np.mean(np.asarray(jax.device_get(losses)), axis=0)


def build_session(config, sd, text, specs, mesh, workdir: Path) -> Session:
    """Mappers (one per concept, stacked on a leading concept axis, each from its own seed),
    the data each step draws from (latent moments cached under workdir/cache), optimizer and
    the initial state, with the shardings of every part."""
    placeholder_ids, target_norms = text.placeholder_ids, text.target_norms
    mapper_config = mapper_config_from(config, sd)
    super_embeddings = np.asarray(text.text_params["embeddings"]["token_embedding"]["embedding"])
    seeds = [concept_seed(config.train.seed, spec.placeholder) for spec in specs]
    mappers, variables = [], []
    for index, spec in enumerate(specs):
        # The placeholder's row starts as the super-category's: the baseline's init.
        mapper = build_mapper(config.mapper.kind, mapper_config,
                              init_embedding=super_embeddings[placeholder_ids[index]])
        mappers.append(mapper)
        variables.append(init_mapper_variables(mapper, jax.random.key(seeds[index])))
    stacked_variables = jax.tree.map(lambda *xs: jnp.stack(xs), *variables)
    data = build_concept_data(specs, sd, text.tokenizer, placeholder_ids, target_norms,
                              stacked_variables, workdir, config.data.resolution, seeds)

    lr = learning_rate(config, mesh)
    t = config.train
    optimizer = optax.adamw(lr, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                            weight_decay=t.weight_decay)
    params = stacked_variables["params"]
    state = TrainState(step=jnp.int32(0), params=params,
                       opt_state=jax.vmap(optimizer.init)(params))
    state_shardings = TrainState(
        step=sharding.tree_shardings(state.step, mesh, sharding.REPLICATED),
        params=sharding.tree_shardings(state.params, mesh, sharding.CONCEPT_LEADING),
        opt_state=sharding.tree_shardings(state.opt_state, mesh, sharding.CONCEPT_LEADING))
    frozen = (sd.unet_params, text.text_params)

    batch_sharding = None
    if mesh.shape["data"] > 1:
        batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    statics = StepStatics(unet=sd.unet, text_encoder=text.text_encoder, mapper=mappers[0],
                          mapper_config=mapper_config,
                          prediction_type=sd.scheduler_config.prediction_type,
                          scaling_factor=sd.vae_config.scaling_factor, batch_size=t.batch_size,
                          grad_accum=t.grad_accum,
                          num_train_timesteps=sd.scheduler_config.num_train_timesteps,
                          batch_sharding=batch_sharding)
    concepts = [Concept(kind=config.mapper.kind, mapper_config=mapper_config, variables=None,
                        placeholder=s.placeholder, super_category=s.super_category,
                        target_norm=target_norms[i], base_model=config.model,
                        learnable_property=s.learnable_property, train_config=config.to_dict())
                for i, s in enumerate(specs)]
    return Session(specs=specs, concepts=concepts, mapper_config=mapper_config, data=data,
                   frozen=frozen, schedule=ddpm_schedule(sd.scheduler_config), statics=statics,
                   optimizer=optimizer, learning_rate=lr, initial_state=state,
                   state_shardings=state_shardings,
                   data_shardings=sharding.tree_shardings(data, mesh, sharding.CONCEPT_LEADING),
                   frozen_shardings=sharding.tree_shardings(frozen, mesh, sharding.REPLICATED))


def run(config, workdir: str) -> None:
    workdir = Path(workdir)
    # --- Devices and mesh.
    maybe_initialize_distributed(config.distributed)
    mesh = make_mesh(dict(config.mesh))
    config_dict = config.to_dict()

    # --- The frozen model and the concepts (everything validated before any compute).
    specs = concept_specs(config)
    # Images and the workdir first: a typo there must not wait for the model to load.
    for spec in specs:
        load_concept_images(spec.images, config.data.resolution)  # fail fast, by name
    check_compatible(workdir, config_dict, RESUMABLE_KEYS)
    sd = load_stable_diffusion(resolve_builtin(config.model), compute_dtype(config.compute_dtype))
    print(model_summary(sd), flush=True)
    text = prepare_text_encoder(sd.text_encoder, sd.tokenizer, sd.text_params,
                                [s.placeholder for s in specs], [s.super_category for s in specs])
    session = build_session(config, sd, text, specs, mesh, workdir)
    t = config.train

    # --- Restore or init.
    checkpointer = Checkpointer(workdir, keep=t.keep_checkpoints, async_save=t.async_checkpoints)
    start = checkpointer.latest_step() or 0
    if start:
        abstract = sharding.sharded_abstract(session.initial_state, session.state_shardings)
        state, _, _ = checkpointer.restore(start, abstract_state=abstract)
        truncate_metrics(workdir, start)
        print(f"resumed from step {start} in {workdir}", flush=True)
    else:
        state = sharding.shard_put(session.initial_state, session.state_shardings)
    session.put()

    # --- The compiled step (ahead of time; weights are arguments, the state is donated).
    compile_start = time.perf_counter()
    compiled = session.step_fn().lower(state, session.data, session.frozen,
                                       session.schedule).compile()
    print(f"step compiled in {time.perf_counter() - compile_start:.1f} s; lr "
          f"{session.learning_rate:g}; {len(specs)} concept(s) on mesh {dict(mesh.shape)}",
          flush=True)

    # --- The loop.
    metadata = {"concepts": [dataclasses.asdict(s) for s in specs]}
    progress = Progress(t.steps, t.log_every, workdir, start_step=start)
    last_saved = start
    try:
        for step in range(start + 1, t.steps + 1):
            state, losses = compiled(state, session.data, session.frozen, session.schedule)
            loss = np.asarray(losses)
            if not np.isfinite(loss).all():
                raise UserError(
                    f"loss is {loss.tolist()} at step {step}: training stopped; the last good "
                    f"checkpoint (step {last_saved}) is kept in {workdir}/checkpoints. Lower "
                    "train.learning_rate or check the images")
            progress.update(step, loss=float(loss.mean()))
            if step % t.checkpoint_every == 0 or step == t.steps:
                checkpointer.save(step, state, config_dict, metadata)
                last_saved = step
            if config.validation.every and (step % config.validation.every == 0
                                            or step == t.steps):
                write_validation_grids(workdir / "validation" / f"step_{step:06d}", sd, text,
                                       session.concepts, state.params, session.data.encoding,
                                       config.validation)
    finally:
        progress.close()
        checkpointer.close()

    # --- Artifacts: one standalone concept per spec.
    for index, (spec, concept) in enumerate(zip(specs, session.concepts)):
        concept.variables = concept_variables(state.params, session.data.encoding, index)
        folder = save_concept(workdir / "concept" if len(specs) == 1
                              else workdir / "concepts" / spec.name, concept)
        print(f"concept {spec.placeholder} -> {folder}", flush=True)


def concept_variables(stacked_params, stacked_encoding, index: int) -> dict:
    take = lambda tree: jax.tree.map(lambda x: np.asarray(jax.device_get(x))[index], tree)
    return {"params": take(stacked_params), **take(stacked_encoding)}


def write_validation_grids(folder: Path, sd, text, concepts, stacked_params, stacked_encoding,
                           validation) -> None:
    """The reference's validation: prompts x seeds per concept, as grids."""
    for index, concept in enumerate(concepts):
        variables = concept_variables(stacked_params, stacked_encoding, index)
        prompts = format_prompts(validation.prompts, concept.placeholder)
        rows = [p for p in prompts for _ in validation.seeds]
        seeds = [s for _ in prompts for s in validation.seeds]
        images = generate(sd, text, concept, text.placeholder_ids[index], concept.target_norm,
                          rows, seeds, variables=variables,
                          num_steps=validation.steps, guidance_scale=validation.guidance_scale,
                          method=validation.sampler)
        name = concept.placeholder.strip("<>") or f"concept{index}"
        save_grid(folder / f"{name}.png", images, rows=len(prompts), cols=len(validation.seeds),
                  row_labels=list(validation.prompts), col_labels=[f"seed {s}" for s in
                                                                   validation.seeds])
