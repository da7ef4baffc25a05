"""The `neti` job: learn each concept's space-time mapper on a frozen Stable Diffusion.

One concept (`configs/neti.py`: config.concept + data.images) or a batch of them
(`configs/neti_batch.py`: data.concepts, a folder of concept folders or a manifest; see
spacetime_jax/neti/batch.py), one code path: every concept-indexed array has a leading axis K,
padded to a multiple of the mesh's `concept` axis.

Reads top to bottom: devices and mesh, the frozen model, the concepts (validated before any
compute), the data each step draws from, the mappers and optimizer, restore or init, the
compiled step, the loop (progress, checkpoints, validation grids, a clean stop on SIGTERM),
the artifacts.
"""
from __future__ import annotations

import dataclasses
import functools
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spacetime_jax.data.images import find_image_files, load_concept_images
from spacetime_jax.data.latents import LatentMoments, concept_latent_cache
from spacetime_jax.data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES
from spacetime_jax.diffusion.schedules import ddpm_schedule
from spacetime_jax.errors import UserError
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import (load_model_tokenizer, load_stable_diffusion,
                                             model_summary)
from spacetime_jax.models.tokenizer import (check_prompt_length, find_token_positions, tokenize,
                                            warn_unknown_words)
from spacetime_jax.neti.batch import (ConceptSpec, check_images, check_tokens,
                                      concept_name, concept_passes, concepts_per_pass,
                                      folder_placeholder, pad_rows, padded_count,
                                      read_concept_set, real_rows, resize_rows)
from spacetime_jax.neti.concept import Concept, prepare_text_encoder, save_concept
from spacetime_jax.neti.mapper import MapperConfig, build_mapper, init_mapper_variables
from spacetime_jax.neti.sample import format_prompts, generate
from spacetime_jax.neti.step import (ConceptData, StepStatics, TrainState, evaluation_loss,
                                     train_step)
from spacetime_jax.parallel import sharding
from spacetime_jax.parallel.mesh import make_mesh, replicas_per_concept, topology, tracing_mesh
from spacetime_jax.parallel.multihost import (addressable_rows, fail_together, is_lead,
                                              lead_print, put_process_rows, to_host)
from spacetime_jax.paths import PathLike, as_path
from spacetime_jax.pipelines.sample_job import compute_dtype
from spacetime_jax.training.checkpoint import check_compatible
from spacetime_jax.training.config_checks import check_training_config
from spacetime_jax.training.loop import LoopSettings, TrainingLoop
from spacetime_jax.training.progress import track
from spacetime_jax.training.remat import check_remat_policy
from spacetime_jax.visualize import image_grid, save_png

TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
# Keys a resumed run may change without a new workdir. The mesh and the processes may change
# too: the loop then checks that the batch and learning rate stay (parallel.mesh.topology).
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.remat_policy",
                  "train.concepts_per_pass", "attention",
                  "validation", "mesh", "distributed")
NONFINITE_HINT = "Lower train.learning_rate or check the images"


def is_batch(config) -> bool:
    """A batch run (configs/neti_batch.py: data.concepts): its outputs go to per-concept
    folders, even for one concept."""
    return "concepts" in config.data


def concept_specs(config) -> list[ConceptSpec]:
    """The concepts of a run: the one of `config.concept` / `data.images`, or the batch that
    `data.concepts` names (a folder of concept folders or a manifest)."""
    c = config.concept
    if c.learnable_property not in TEMPLATES:
        raise UserError(f"concept.learnable_property={c.learnable_property!r}: use 'object' or "
                        "'style'")
    if is_batch(config):
        if not config.data.concepts:
            raise UserError("data.concepts is not set: --config.data.concepts=DIR (one "
                            "sub-folder of images per concept, or a concepts.csv manifest)")
        if config.data.images:
            raise UserError("data.images and data.concepts are both set: a batch run takes "
                            "its concepts from data.concepts alone")
        return read_concept_set(config.data.concepts, c.super_category, c.learnable_property)
    if not config.data.images:
        raise UserError("data.images is not set: --config.data.images=FOLDER of the concept's "
                        "images")
    # The concept is the user's folder: its name is the placeholder unless one is given.
    placeholder = c.placeholder or folder_placeholder(as_path(config.data.images).name)
    return [ConceptSpec(concept_name(placeholder), config.data.images, placeholder,
                        c.super_category, c.learnable_property)]


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
                       workdir: PathLike, resolution: int, seeds: list[int],
                       count: int | None = None, load: set[int] | None = None) -> ConceptData:
    """Tokenized templates, cached latent moments and fixed mapper variables, stacked on K and
    padded to `count` rows (default: no padding) with copies of the last concept, which
    `real` marks as padding.

    `load`: the concepts whose images this process reads and encodes (default: all); the
    others' moment rows stay zero here, since another process holds them (put_process_rows
    takes each process's own rows). Row counts come from listing every folder, so every
    process builds the same shapes."""
    load = set(range(len(specs))) if load is None else load
    counts = [2 * len(find_image_files(spec.images).paths) for spec in specs]
    rows = max(counts)
    side = resolution // sd.vae_config.downsample_factor
    empty = np.zeros((rows, side, side, sd.vae_config.latent_channels), np.float32)
    means, logvars, prompt_ids, positions = [], [], [], []
    for index, spec in enumerate(specs):
        mean, logvar = empty, empty
        if index in load:
            images, _ = load_concept_images(spec.images, resolution)
            moments = concept_latent_cache(as_path(workdir) / "cache" / spec.name, sd.vae,
                                           sd.vae_params, images, sd.source)
            pad = lambda a: np.concatenate([a, np.repeat(a[:1], rows - len(a), axis=0)])
            mean, logvar = pad(np.asarray(moments.mean)), pad(np.asarray(moments.logvar))
        means.append(mean)
        logvars.append(logvar)
        prompts = format_prompts(TEMPLATES[spec.learnable_property], spec.placeholder)
        for prompt in prompts:
            check_prompt_length(tokenizer, prompt)
        ids = tokenize(tokenizer, prompts)
        prompt_ids.append(ids)
        positions.append(find_token_positions(ids, placeholder_ids[index], prompts))
    count = count or len(specs)
    data = ConceptData(moments=LatentMoments(np.stack(means), np.stack(logvars)),
                       num_rows=np.asarray(counts, np.int32),
                       prompt_ids=np.stack(prompt_ids), positions=np.stack(positions),
                       target_norms=np.asarray(target_norms[:len(specs)], np.float32),
                       seeds=np.asarray(seeds, np.uint32),
                       encoding={k: v for k, v in variables.items() if k != "params"})
    return pad_rows(data, count).replace(real=real_rows(len(specs), count))


def concepts_of_this_process(num_concepts: int, count: int, mesh) -> set[int]:
    """The concepts whose rows (padding: copies of the last concept) lie on this process's
    devices when `count` rows are split over the mesh's concept axis."""
    rows = addressable_rows(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("concept")),
                            count)
    return {min(row, num_concepts - 1) for row in rows}


def concept_seed(train_seed: int, placeholder: str) -> int:
    """A concept's own seed (mapper init and every step's draws): the same concept trained
    alone or beside others, at any position of a batch, learns the same thing."""
    return (int(train_seed) * 1_000_003 + zlib.crc32(placeholder.encode())) % 2**32


@dataclasses.dataclass
class Session:
    """One run's concepts, data, frozen model and compiled-step ingredients, built once; the
    job, the tests and the quality benchmark all step through it.

    The state and data have `padded_count` rows on their concept axis: the K = len(specs)
    concepts, then padding up to a multiple of the mesh's concept axis (`data.real` False).
    Concept index k < K means the same concept everywhere."""
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
    checkpoint_shardings: TrainState  # of the state's K real rows (what is saved)

    @property
    def padded_count(self) -> int:
        return int(self.data.seeds.shape[0])

    def checkpoint_state(self, state: TrainState) -> TrainState:
        """The real concepts' rows of `state`: what a checkpoint holds, whatever the mesh."""
        if self.padded_count == len(self.specs):
            return state
        return resize_rows(state, len(self.specs), self.checkpoint_shardings)

    def abstract_checkpoint(self) -> TrainState:
        """What checkpoint_state returns, as a restore target."""
        return sharding.sharded_abstract(real_shapes(self.initial_state, len(self.specs)),
                                         self.checkpoint_shardings)

    def step_state(self, restored: TrainState) -> TrainState:
        """A restored checkpoint padded again and placed for the step."""
        if self.padded_count == len(self.specs):
            return restored
        return resize_rows(restored, self.padded_count, self.state_shardings)

    def put(self) -> None:
        """Places the data (each process its own concept rows) and the frozen weights on the
        mesh (once, before stepping)."""
        self.data = put_process_rows(self.data, self.data_shardings)
        self.frozen = sharding.shard_put(self.frozen, self.frozen_shardings)

    def step_fn(self):
        """The train step, jitted with explicit shardings, the state donated; it returns the
        real concepts' (K,) losses replicated, so that every process can read them."""
        num_concepts = len(self.specs)

        def step(state, data, frozen, schedule):
            state, losses = train_step(state, data, frozen, schedule, optimizer=self.optimizer,
                                       statics=self.statics)
            return state, losses[:num_concepts]

        replicated = jax.sharding.NamedSharding(self.statics.batch_sharding.mesh,
                                                jax.sharding.PartitionSpec())
        return jax.jit(step, in_shardings=(self.state_shardings, self.data_shardings,
                                           self.frozen_shardings, None),
                       out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))

    @functools.cached_property
    def _evaluation_loss(self):
        return jax.jit(functools.partial(evaluation_loss, statics=self.statics))

    def evaluate(self, params, num_draws: int, seed: int = 0) -> np.ndarray:
        """(K,) mean loss of `params` over `num_draws` fixed draws of (example, noise,
        timestep) per concept, without nested dropout: the same draws for any params and any
        mapper kind, so losses of different runs compare on the same held-out pairs."""
        per_call = self.statics.batch_size * self.statics.grad_accum
        calls = -(-num_draws // per_call)
        losses = [self._evaluation_loss(params, self.data, self.frozen, self.schedule,
                                        jnp.full((self.padded_count,), 1_000_003 * seed + i,
                                                 jnp.uint32))
                  for i in range(calls)]
        return np.mean(np.asarray(jax.device_get(losses)), axis=0)[:len(self.specs)]


def real_shapes(state: TrainState, num_concepts: int) -> TrainState:
    """`state`'s leaves as shapes, cut to the first `num_concepts` rows of the concept axis."""
    def cut(x):
        shape = (num_concepts,) + tuple(x.shape[1:]) if np.ndim(x) else ()
        return jax.ShapeDtypeStruct(shape, x.dtype)
    return jax.tree.map(cut, state)


def build_session(config, sd, text, specs, mesh, workdir: PathLike) -> Session:
    """Mappers (one per concept, stacked on a leading concept axis, each from its own seed),
    the data each step draws from (latent moments cached under workdir/cache), optimizer and
    the initial state, with the shardings of every part.

    `text` may know more placeholders than `specs` (spec k uses its k-th); the concept axis is
    padded to a multiple of the mesh's `concept` axis. train.batch_size is per data replica:
    a concept's micro-batch is batch_size x its replicas, and the learning rate scales with
    them (learning_rate), so a concept learns the same alone or among others on as many
    replicas."""
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
    passes = step_passes(config, len(specs), mesh)
    count = padded_count(len(specs), mesh, passes)
    stacked_variables = pad_rows(jax.tree.map(lambda *xs: np.stack(xs), *variables), count)
    data = build_concept_data(specs, sd, text.tokenizer, placeholder_ids, target_norms,
                              stacked_variables, workdir, config.data.resolution, seeds, count,
                              load=concepts_of_this_process(len(specs), count, mesh))

    lr = learning_rate(config, mesh)
    t = config.train
    optimizer = optax.adamw(lr, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                            weight_decay=t.weight_decay)
    params = stacked_variables["params"]
    state = TrainState(step=jnp.int32(0), params=params,
                       opt_state=jax.vmap(optimizer.init)(params))
    state_shardings = concept_state_shardings(state, mesh)
    frozen = (sd.unet_params, text.text_params)
    # The U-Net's big kernels over `model` when there is one; the text encoder is small.
    unet_rules = sharding.MODEL_SHARDED_UNET if mesh.shape["model"] > 1 else sharding.REPLICATED
    frozen_shardings = (sharding.tree_shardings(sd.unet_params, mesh, unet_rules),
                        sharding.tree_shardings(text.text_params, mesh, sharding.REPLICATED))

    # Remat trades recompute for activation memory in the backward pass, in the U-Net's
    # blocks and the text encoder's layers; the loaded modules (dtype, params) are otherwise
    # the ones the step runs.
    remat_policy = check_remat_policy(t.remat_policy, "train.remat_policy")
    unet = sd.unet.clone(remat_policy=remat_policy)
    text_encoder = text.text_encoder.clone(remat_policy=remat_policy)
    statics = StepStatics(unet=unet, text_encoder=text_encoder, mapper=mappers[0],
                          mapper_config=mapper_config,
                          prediction_type=sd.scheduler_config.prediction_type,
                          scaling_factor=sd.vae_config.scaling_factor,
                          batch_size=t.batch_size * replicas_per_concept(mesh),
                          grad_accum=t.grad_accum,
                          num_train_timesteps=sd.scheduler_config.num_train_timesteps,
                          batch_sharding=jax.sharding.NamedSharding(
                              mesh, jax.sharding.PartitionSpec("data")),
                          concept_passes=passes)
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
                   frozen_shardings=frozen_shardings,
                   checkpoint_shardings=concept_state_shardings(
                       real_shapes(state, len(specs)), mesh))


def step_passes(config, num_concepts: int, mesh) -> int:
    """Passes of the step over the concepts (train.concepts_per_pass on this backend)."""
    per_pass = concepts_per_pass(config.train.concepts_per_pass, jax.default_backend())
    return concept_passes(num_concepts, mesh, per_pass)


def concept_state_shardings(state: TrainState, mesh) -> TrainState:
    """The step counter replicated, everything else split on its leading concept axis (or
    replicated where that axis does not divide: a checkpoint's K real rows)."""
    return TrainState(
        step=sharding.tree_shardings(state.step, mesh, sharding.REPLICATED),
        params=sharding.tree_shardings(state.params, mesh, sharding.CONCEPT_LEADING),
        opt_state=sharding.tree_shardings(state.opt_state, mesh, sharding.CONCEPT_LEADING))


def run(config, workdir: str) -> None:
    # --- Devices and mesh. Every process of a multi-process run runs all of this and each
    # step; process 0 alone prints and writes metrics, validation grids and the concepts
    # (checkpoints are orbax's, which coordinates the processes itself). main.py joined the
    # processes and resolved every path.
    check_training_config(config)
    mesh = make_mesh(dict(config.mesh))
    workdir = as_path(workdir)
    config_dict = config.to_dict()

    # --- The frozen model and the concepts (everything validated before any compute).
    specs = concept_specs(config)
    check_remat_policy(config.train.remat_policy, "train.remat_policy")
    # Images and the workdir first: a typo there must not wait for the model to load. Each
    # process decodes the images it will train on; a bad one stops every process.
    count = padded_count(len(specs), mesh, step_passes(config, len(specs), mesh))
    mine = concepts_of_this_process(len(specs), count, mesh)
    fail_together("concept images", lambda: check_images(
        [spec for index, spec in enumerate(specs) if index in mine], config.data.resolution))
    check_compatible(workdir, config_dict, RESUMABLE_KEYS)
    # Tokens need the tokenizer alone: a bad placeholder or super-category waits for no weights.
    model = resolve_builtin(config.model)
    tokenizer = load_model_tokenizer(model, config.model_revision)
    check_tokens(specs, tokenizer)
    if config.validation.every:
        warn_unknown_words(tokenizer, config.validation.prompts, "validation.prompts",
                           config.model)
    sd = load_stable_diffusion(model, compute_dtype(config.compute_dtype),
                               revision=config.model_revision, attention=config.attention)
    lead_print(model_summary(sd))
    text = prepare_text_encoder(sd.text_encoder, sd.tokenizer, sd.text_params,
                                [s.placeholder for s in specs], [s.super_category for s in specs])
    session = build_session(config, sd, text, specs, mesh, workdir)
    t = config.train
    K = len(specs)

    # --- Restore or init (a checkpoint holds the K real concepts; the padding is the mesh's).
    loop = TrainingLoop(
        workdir, LoopSettings.from_config(t, validate_every=config.validation.every),
        config_dict, {"concepts": [dataclasses.asdict(s) for s in specs]},
        topology(mesh, global_batch=session.statics.batch_size * t.grad_accum,
                 learning_rate=session.learning_rate),
        nonfinite_hint=NONFINITE_HINT)
    state, start = loop.restore_or_init(
        lambda: sharding.shard_put(session.initial_state, session.state_shardings),
        session.abstract_checkpoint(), session.step_state)
    session.put()

    # --- The compiled step (ahead of time; weights are arguments, the state is donated).
    compile_start = time.perf_counter()
    with tracing_mesh(mesh, config.attention):
        compiled = session.step_fn().lower(state, session.data, session.frozen,
                                           session.schedule).compile()
    padding = session.padded_count - K
    lead_print(f"step compiled in {time.perf_counter() - compile_start:.1f} s; lr "
               f"{session.learning_rate:g}; {K} concept(s)"
               f"{f' (+{padding} padding)' if padding else ''} on mesh {dict(mesh.shape)}"
               + (f", in {session.statics.concept_passes} passes"
                  if session.statics.concept_passes > 1 else ""))

    # --- The loop (checkpoints, SIGTERM, non-finite stop, progress: training/loop.py).
    def step(state, _):
        state, losses = compiled(state, session.data, session.frozen, session.schedule)
        return state, {"loss": losses}

    def validate(step_number: int, state) -> dict:
        variables = concepts_to_host(state.params, session.data.encoding, K)
        if not is_lead():
            return {}
        grids = write_validation_grids(workdir / "validation" / f"step_{step_number:06d}", sd,
                                       text, session.concepts, [s.name for s in specs],
                                       variables, config.validation, step_number)
        return {f"validation/{name}": grid for name, grid in grids.items()}

    state = loop.run(state, start, step, to_checkpoint=session.checkpoint_state,
                     validate=validate)

    # --- Artifacts: one standalone concept per spec.
    variables = concepts_to_host(state.params, session.data.encoding, K)
    if not is_lead():
        return
    for spec, concept, concept_vars in zip(specs, session.concepts, variables):
        concept.variables = concept_vars
        folder = save_concept(workdir / "concepts" / spec.name if is_batch(config)
                              else workdir / "concept", concept)
        print(f"concept {spec.placeholder} -> {folder}", flush=True)


def concepts_to_host(stacked_params, stacked_encoding, num_concepts: int) -> list[dict]:
    """Each real concept's mapper variables as numpy trees, on every process (a collective:
    the concept axis may span processes)."""
    params, encoding = to_host((stacked_params, stacked_encoding))
    take = lambda tree, index: jax.tree.map(lambda x: x[index], tree)
    return [{"params": take(params, index), **take(encoding, index)}
            for index in range(num_concepts)]


def write_validation_grids(folder: PathLike, sd, text, concepts, names, variables,
                           validation, step: int) -> dict[str, np.ndarray]:
    """The reference's validation: prompts x seeds per concept, as grids (folder/<name>.png),
    titled with the concept and `step`. Returns {name: the grid's pixels} (for TensorBoard)."""
    grids = {}
    for index, (concept, name) in enumerate(track(list(zip(concepts, names)),
                                                  "validation sampling", unit="concept")):
        prompts = format_prompts(validation.prompts, concept.placeholder)
        rows = [p for p in prompts for _ in validation.seeds]
        seeds = [s for _ in prompts for s in validation.seeds]
        images = generate(sd, text, concept, text.placeholder_ids[index], concept.target_norm,
                          rows, seeds, variables=variables[index],
                          num_steps=validation.steps, guidance_scale=validation.guidance_scale,
                          method=validation.sampler)
        grid = image_grid(images, rows=len(prompts), cols=len(validation.seeds),
                          row_labels=prompts,
                          col_labels=[f"seed {s}" for s in validation.seeds],
                          title=f"NeTI {concept.placeholder}, step {step}: validation prompts "
                                f"x seeds {', '.join(map(str, validation.seeds))}")
        save_png(as_path(folder) / f"{name}.png", grid)
        grids[name] = np.asarray(grid)
    return grids
