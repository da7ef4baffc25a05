"""The `elite` job: stage 1 (global mapper + K/V copies) or stage 2 (local mapper + local K/V)
on a frozen Stable Diffusion, from an object-crop dataset built by tensorflow-datasets.

Reads top to bottom: devices and mesh, the dataset (checked before the model loads), the
frozen model and encoder, the state and optimizer, restore or init, the compiled step, the
loop (progress, held-out loss, checkpoints, validation grids, a clean stop on SIGTERM), the
encoder folder. Batches are a pure function of (seed, step): the checkpoint's step counter is
the input pipeline's whole state, and each process builds only its slice of every batch.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from spacetime_jax.elite import pipeline
from spacetime_jax.elite.artifact import ENCODER_DIR, load_encoder, save_encoder
from spacetime_jax.elite.conditioning import format_prompts
from spacetime_jax.elite.data import (ObjectCrops, build_object_crops, crops_config,
                                      open_object_crops)
from spacetime_jax.elite.encoder import init_mapper_params
from spacetime_jax.elite.params import cross_attention_kv, local_kv_init
from spacetime_jax.elite.sample import EliteModel, EncoderParams, generate, load_model
from spacetime_jax.elite.step import (STAGES, Frozen, StepStatics, TrainState, evaluation_loss,
                                      make_optimizer, train_step)
from spacetime_jax.errors import UserError
from spacetime_jax.models.builtin import cache_dir
from spacetime_jax.models.pretrained import model_summary
from spacetime_jax.diffusion.schedules import ddpm_schedule
from spacetime_jax.parallel import sharding
from spacetime_jax.parallel.mesh import make_mesh, topology, tracing_mesh
from spacetime_jax.parallel.multihost import (build_once, is_lead, lead_print,
                                              put_process_rows, to_host)
from spacetime_jax.paths import PathLike, as_path, is_remote
from spacetime_jax.training.checkpoint import check_compatible
from spacetime_jax.training.config_checks import check_at_least, check_training_config
from spacetime_jax.training.loop import LoopSettings, TrainingLoop
from spacetime_jax.training.progress import track
from spacetime_jax.training.remat import check_remat_policy
from spacetime_jax.visualize import image_grid, save_png

# The batch is global (train.batch_size over all devices) and the learning rate does not
# scale with devices, so the mesh and the processes may change on resume.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.remat_policy", "attention",
                  "validation", "data.prefetch", "data.prefetch_workers", "mesh", "distributed")
NONFINITE_HINT = "Lower train.learning_rate or check the data"
TOYWORLD_OBJECTS = "builtin:toyworld_objects"
# The toy-world object set written on first use: enough objects that a few hundred steps of
# batch 8 do not repeat them much; the test split holds held-out shapes and textures.
TOYWORLD_TRAIN, TOYWORLD_TEST, TOYWORLD_SEED, TOYWORLD_IMAGE_SIZE = 2000, 64, 0, 128


# ---------------------------------------------------------------------------------------
# Data.

def dataset_root(root: str):
    """The dataset folder (local or gs://); builtin:toyworld_objects is written on first use
    into each process's cache (process 0 first: see build_once)."""
    if not root:
        raise UserError("data.root is not set: --config.data.root=FOLDER in OpenImages' layout "
                        f"(see spacetime_jax/elite/data.py), or {TOYWORLD_OBJECTS}")
    if root != TOYWORLD_OBJECTS:
        return as_path(root)
    folder = cache_dir() / (f"toyworld_objects_{TOYWORLD_TRAIN}_{TOYWORLD_TEST}_"
                            f"{TOYWORLD_SEED}_{TOYWORLD_IMAGE_SIZE}")
    build_once("toyworld objects", folder.is_dir, lambda: _write_toyworld_objects(folder))
    return as_path(folder)


def _write_toyworld_objects(folder) -> None:
    """Writes beside, then renames: the folder is whole or absent, also after a kill."""
    from spacetime_jax.elite.toyworld_data import write_toyworld_objects
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    write_toyworld_objects(partial, TOYWORLD_TRAIN, TOYWORLD_TEST, TOYWORLD_SEED,
                           TOYWORLD_IMAGE_SIZE)
    try:
        os.rename(partial, folder)
    except OSError:  # another process of this machine renamed its identical copy first
        shutil.rmtree(partial, ignore_errors=True)


def tfds_dir(config, root):
    """Where the dataset of `root` is built: one folder per source folder, so pointing
    data.root elsewhere never reads a dataset built from another folder. Default: this
    process's cache (a pod worker builds its own copy; data.tfds_dir=gs://... shares one)."""
    base = as_path(config.data.tfds_dir) if config.data.tfds_dir else as_path(cache_dir() / "tfds")
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return base / f"{as_path(root).name}-{digest}"


def open_split(config, split: str):
    """One split of the object-crop dataset, built first where it is missing (process 0
    first; then each process that does not see it, on its own disk)."""
    root = dataset_root(config.data.root)
    data_dir = tfds_dir(config, root)
    crops = crops_config(config.data)
    build_once("elite dataset",
               lambda: ObjectCrops(config=crops, data_dir=os.fspath(data_dir)).is_prepared(),
               lambda: build_object_crops(root, crops, data_dir))
    return open_object_crops(root, crops, data_dir, split)


# ---------------------------------------------------------------------------------------
# The frozen model and the encoder.

def global_encoder_folder(path: str):
    """A stage-1 workdir (its encoder/) or an encoder folder."""
    if not path:
        raise UserError("global_checkpoint is not set: stage 2 needs the stage-1 encoder "
                        "(--config.global_checkpoint=STAGE1_WORKDIR or an encoder folder)")
    folder = as_path(path)
    if (folder / ENCODER_DIR / "encoder.json").is_file():
        return folder / ENCODER_DIR
    return folder


def load_global_stage(path: str, model: EliteModel):
    encoder = load_encoder(global_encoder_folder(path))
    if encoder.config != model.encoder_config:
        raise UserError(f"global_checkpoint {path}: its encoder {encoder.config} does not match "
                        f"this config's {model.encoder_config} (another model or feature "
                        "layers?)")
    return encoder


# ---------------------------------------------------------------------------------------
# Batches.

def pipeline_spec(config, model: EliteModel, seed: int, global_batch: int
                  ) -> pipeline.PipelineSpec:
    return pipeline.PipelineSpec(stage=config.stage, global_batch=global_batch,
                                 resolution=config.data.resolution, clip_size=model.clip_size,
                                 encode_prompt=model.text.encode_prompt,
                                 placeholder=config.placeholder, seed=seed)


def stack_micro_batches(parts: list[dict]) -> dict:
    return {key: np.stack([p[key] for p in parts]) for key in parts[0]}


def batch_arrays(source, spec: pipeline.PipelineSpec, step: int, micro_batches: int) -> dict:
    """This process's rows of step `step`: (micro_batches, rows, ...) numpy arrays; micro-batch
    a of step s is the pipeline's step s * micro_batches + a."""
    return stack_micro_batches([
        pipeline.host_batch(source, spec, step * micro_batches + a, jax.process_index(),
                            jax.process_count()) for a in range(micro_batches)])


def to_global(arrays: dict, batch_sharding: NamedSharding, global_batch: int) -> dict:
    """This process's rows as one global array per key, laid out over `data`."""
    def one(x):
        shape = (x.shape[0], global_batch) + x.shape[2:]
        return jax.make_array_from_process_local_data(batch_sharding, x, shape)
    return {key: one(value) for key, value in arrays.items()}


# ---------------------------------------------------------------------------------------
# The session: everything a step needs, built once (the job and the tests use it).

@dataclasses.dataclass
class Session:
    model: EliteModel
    statics: StepStatics
    frozen: Frozen
    schedule: Any
    optimizer: Any
    learning_rate: float
    initial_state: TrainState
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: NamedSharding
    global_stage: Any = None  # stage 2: the loaded stage-1 encoder

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.batch_sharding.mesh, P())

    def step_fn(self):
        """The train step, jitted with explicit shardings, the state donated; its metrics
        come back replicated, readable on every process."""
        return jax.jit(functools.partial(train_step, optimizer=self.optimizer,
                                         statics=self.statics),
                       in_shardings=(self.state_shardings, self.batch_sharding,
                                     self.frozen_shardings, None, None),
                       out_shardings=(self.state_shardings, self.replicated),
                       donate_argnums=(0,))

    @functools.cached_property
    def _evaluation_loss(self):
        return jax.jit(functools.partial(evaluation_loss, statics=self.statics),
                       out_shardings=self.replicated)

    def evaluate(self, params, batch, seed: int) -> dict:
        out = self._evaluation_loss(params, batch, self.frozen, self.schedule, jnp.uint32(seed))
        return {k: float(v) for k, v in jax.device_get(out).items()}

    def encoder_params(self, params) -> EncoderParams:
        """The trained encoder as numpy trees on every process (a collective: the params may
        span processes)."""
        params = to_host(params)
        if self.statics.stage == "global":
            return EncoderParams(global_mapper=params["mapper"], global_kv=params["kv"])
        g = self.global_stage
        return EncoderParams(global_mapper=g.global_params["mapper"],
                             global_kv=g.global_params["kv"], local_mapper=params["mapper"],
                             local_kv=params["kv"])


def learning_rate(config) -> float:
    t = config.train
    return t.learning_rate * (t.batch_size * t.grad_accum if t.scale_lr else 1)


def build_session(config, model: EliteModel, mesh) -> Session:
    if config.stage not in STAGES:
        raise UserError(f"stage={config.stage!r} is unknown; use one of {STAGES}")
    t = config.train
    sd = model.sd
    if t.batch_size % mesh.shape["data"]:
        raise UserError(f"train.batch_size {t.batch_size} is not a multiple of the mesh's data "
                        f"axis ({mesh.shape['data']} devices): the batch is split over them")
    key = jax.random.key(t.seed)
    local = config.stage == "local"
    global_stage = load_global_stage(config.global_checkpoint, model) if local else None
    params = {"mapper": init_mapper_params(model.encoder_config, key, local=local),
              "kv": local_kv_init(sd.unet_params) if local else cross_attention_kv(sd.unet_params)}
    # The trainable tree stays fp32 whatever the frozen model's compute dtype.
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    lr = learning_rate(config)
    optimizer = make_optimizer(lr, t)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params))
    frozen = Frozen(unet=sd.unet_params, text=model.text.text_params,
                    vision=model.vision_params, vae=sd.vae_params,
                    global_mapper=global_stage.global_params["mapper"] if local else None,
                    global_kv=global_stage.global_params["kv"] if local else None)
    unet_rules = sharding.MODEL_SHARDED_UNET if mesh.shape["model"] > 1 else sharding.REPLICATED
    frozen_shardings = Frozen(
        unet=sharding.tree_shardings(frozen.unet, mesh, unet_rules),
        text=sharding.tree_shardings(frozen.text, mesh, sharding.REPLICATED),
        vision=sharding.tree_shardings(frozen.vision, mesh, sharding.REPLICATED),
        vae=sharding.tree_shardings(frozen.vae, mesh, sharding.REPLICATED),
        global_mapper=(sharding.tree_shardings(frozen.global_mapper, mesh,
                                               sharding.ELITE_TRAINABLE) if local else None),
        global_kv=(sharding.tree_shardings(frozen.global_kv, mesh, sharding.ELITE_TRAINABLE)
                   if local else None))
    trainable_rules = (sharding.ELITE_TRAINABLE if mesh.shape["model"] > 1
                       else sharding.REPLICATED)
    state_shardings = TrainState(
        step=sharding.tree_shardings(state.step, mesh, sharding.REPLICATED),
        params=sharding.tree_shardings(state.params, mesh, trainable_rules),
        opt_state=sharding.tree_shardings(state.opt_state, mesh, trainable_rules))
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    # Remat trades recompute for activation memory in the backward pass (same results), in
    # the U-Net's blocks and the text encoder's layers.
    remat_policy = check_remat_policy(t.remat_policy, "train.remat_policy")
    unet = sd.unet.clone(remat_policy=remat_policy)
    statics = StepStatics(
        stage=config.stage, unet=unet,
        text_encoder=model.text.text_encoder.clone(remat_policy=remat_policy),
        vision=model.vision, vae=sd.vae, global_mapper=model.global_mapper,
        local_mapper=model.local_mapper if local else None,
        feature_layers=tuple(model.encoder_config.feature_layers), patch_grid=model.patch_grid,
        num_layers=sd.num_cross_attention_layers,
        prediction_type=sd.scheduler_config.prediction_type,
        scaling_factor=sd.vae_config.scaling_factor,
        num_train_timesteps=sd.scheduler_config.num_train_timesteps,
        local_scale=float(config.local_scale),
        batch_sharding=NamedSharding(mesh, P("data")))
    return Session(model=model, statics=statics, frozen=frozen,
                   schedule=ddpm_schedule(sd.scheduler_config), optimizer=optimizer,
                   learning_rate=lr, initial_state=state, state_shardings=state_shardings,
                   frozen_shardings=frozen_shardings, batch_sharding=batch_sharding,
                   global_stage=global_stage)


# ---------------------------------------------------------------------------------------
# The job.

def evaluation_batch(source, config, model: EliteModel, session: Session) -> dict:
    """A fixed held-out batch (its own seed, step 0), whole on every process."""
    n = min(config.evaluation.num_examples, len(source))
    spec = pipeline_spec(config, model, config.evaluation.seed, n)
    batch = {k: v[None] for k, v in pipeline.host_batch(source, spec, 0).items()}
    return put_process_rows(batch, {k: session.replicated for k in batch})


def validation_examples(source, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` held-out crops and their masks (0/1)."""
    rows = [source[i] for i in range(min(count, len(source)))]
    images = np.stack([np.asarray(r["image"]) for r in rows])
    masks = np.stack([(np.asarray(r["mask"]) > 127).astype(np.float32) for r in rows])
    return images, masks


def write_validation_grid(path: PathLike, session: Session, encoder: EncoderParams, images,
                          masks, validation, placeholder: str, title: str) -> np.ndarray:
    """Rows: (held-out object, prompt); columns: the object, then seeds (x lambdas in stage 2);
    `title` above. Returns the grid's pixels (for TensorBoard)."""
    prompts = format_prompts(validation.prompts, placeholder)
    scales = list(validation.local_scales) if encoder.has_local else [None]
    rows = [(i, p) for i in range(len(images)) for p in prompts]
    columns = [(s, l) for l in scales for s in validation.seeds]
    cells = []
    resolution = session.model.sd.unet.config.sample_size * \
        session.model.sd.vae_config.downsample_factor
    for scale in track(scales, "validation sampling", unit="call"):
        out = generate(session.model, encoder, np.stack([images[i] for i, _ in rows
                                                          for _ in validation.seeds]),
                       np.stack([masks[i] for i, _ in rows for _ in validation.seeds]),
                       [p for _, p in rows for _ in validation.seeds],
                       [s for _ in rows for s in validation.seeds], local_scale=scale,
                       token_index=None if validation.token_index == "all" else
                       int(validation.token_index), num_steps=validation.steps,
                       guidance_scale=validation.guidance_scale, method=validation.sampler)
        cells.append(out.reshape((len(rows), len(validation.seeds)) + out.shape[1:]))
    generated = np.concatenate(cells, axis=1)  # (rows, columns, H, W, 3)
    sources = np.stack([np.asarray(jax.image.resize(images[i], (resolution, resolution, 3),
                                                     "bilinear")).astype(np.uint8)
                        for i, _ in rows])
    grid = np.concatenate([sources[:, None], generated], axis=1)
    labels = ["object"] + [f"seed {s}" + (f" l={l}" if l is not None else "")
                           for s, l in columns]
    image = image_grid(grid.reshape((-1,) + grid.shape[2:]), rows=len(rows),
                       cols=grid.shape[1], row_labels=[f"object {i}: {p}" for i, p in rows],
                       col_labels=labels, title=title)
    save_png(path, image)
    return np.asarray(image)


def run(config, workdir: str) -> None:
    # --- Devices and mesh (main.py joined the processes and resolved every path).
    mesh = make_mesh(dict(config.mesh))
    workdir = as_path(workdir)
    config_dict = config.to_dict()
    t = config.train

    # --- The config, the dataset and the workdir first: a typo there must not wait for the
    # model.
    if config.stage not in STAGES:
        raise UserError(f"stage={config.stage!r} is unknown; use one of {STAGES}")
    check_training_config(config)
    check_at_least(config, ("evaluation.num_examples",), 1)
    check_remat_policy(t.remat_policy, "train.remat_policy")
    if config.validation.token_index not in ("all", "0", "1", "2", "3", "4"):
        raise UserError(f"validation.token_index={config.validation.token_index!r}: use '0' (the "
                        "primary word) or 'all'")
    check_compatible(workdir, config_dict, RESUMABLE_KEYS)
    if config.stage == "local":
        global_encoder_folder(config.global_checkpoint)
    train_source = open_split(config, config.data.split)
    held_out = open_split(config, config.data.validation_split)
    lead_print(f"data: {len(train_source)} training objects ({config.data.split}), "
               f"{len(held_out)} held out ({config.data.validation_split})")

    model = load_model(config)
    lead_print(model_summary(model.sd))
    session = build_session(config, model, mesh)

    # --- Restore or init.
    loop = TrainingLoop(
        workdir, LoopSettings.from_config(t, validate_every=config.validation.every),
        config_dict, {"stage": config.stage},
        topology(mesh, global_batch=t.batch_size * t.grad_accum,
                 learning_rate=session.learning_rate),
        nonfinite_hint=NONFINITE_HINT)
    state, start = loop.restore_or_init(
        lambda: sharding.shard_put(session.initial_state, session.state_shardings),
        sharding.sharded_abstract(session.initial_state, session.state_shardings))
    frozen = sharding.shard_put(session.frozen, session.frozen_shardings)
    session.frozen = frozen

    # --- The compiled step (ahead of time, for the first batch's shapes).
    spec = pipeline_spec(config, model, t.seed, t.batch_size)
    first = to_global(batch_arrays(train_source, spec, start, t.grad_accum),
                      session.batch_sharding, t.batch_size)
    compile_start = time.perf_counter()
    with tracing_mesh(mesh, config.attention):
        compiled = session.step_fn().lower(state, first, frozen, session.schedule,
                                           jnp.uint32(t.seed)).compile()
    lead_print(f"step compiled in {time.perf_counter() - compile_start:.1f} s; stage "
               f"{config.stage}; lr {session.learning_rate:g}; batch {t.batch_size} x "
               f"{t.grad_accum} on mesh {dict(mesh.shape)}")
    eval_batch = evaluation_batch(held_out, config, model, session)
    val_images, val_masks = (validation_examples(held_out, config.validation.num_images)
                             if is_lead() else (None, None))

    def held_out_loss(params) -> float:
        return session.evaluate(params, eval_batch, config.evaluation.seed)["mse"]

    if not start:
        lead_print(f"held-out loss at step 0: {held_out_loss(state.params):.5f}")

    # --- The loop (checkpoints, SIGTERM, non-finite stop, progress: training/loop.py); each
    # process builds its rows of each batch ahead, on a background thread.
    micro_batches = pipeline.Prefetcher(
        train_source, spec, start * t.grad_accum, jax.process_index(), jax.process_count(),
        depth=max(1, config.data.prefetch) * t.grad_accum,
        workers=max(1, config.data.prefetch_workers))

    def step(state, _):
        arrays = stack_micro_batches([next(micro_batches) for _ in range(t.grad_accum)])
        batch = to_global(arrays, session.batch_sharding, t.batch_size)
        return compiled(state, batch, frozen, session.schedule, jnp.uint32(t.seed))

    def validate(step_number: int, state) -> dict:
        encoder = session.encoder_params(state.params)
        results = {"held_out_loss": held_out_loss(state.params)}
        if is_lead():
            results["validation"] = write_validation_grid(
                workdir / "validation" / f"step_{step_number:06d}.png", session, encoder,
                val_images, val_masks, config.validation, config.placeholder,
                title=f"ELITE {config.stage} stage, step {step_number}: held-out objects x "
                      f"prompts; seeds {', '.join(map(str, config.validation.seeds))}")
        return results

    with micro_batches:
        state = loop.run(state, start, step, validate=validate)

    encoder = session.encoder_params(state.params)
    if is_lead():
        folder = save_trained_encoder(workdir / ENCODER_DIR, session, encoder, config)
        print(f"encoder ({config.stage} stage) -> {folder}", flush=True)


def save_trained_encoder(folder: PathLike, session: Session, encoder: EncoderParams,
                         config):
    local = ({"mapper": encoder.local_mapper, "kv": encoder.local_kv}
             if encoder.has_local else None)
    save_encoder(folder, session.model.encoder_config,
                 {"mapper": encoder.global_mapper, "kv": encoder.global_kv}, local,
                 base_model=config.model,
                 extra={"placeholder": config.placeholder, "train_config": config.to_dict()},
                 image_encoder=config.image_encoder or None)
    return folder
