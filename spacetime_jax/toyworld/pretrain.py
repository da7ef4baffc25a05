"""The `toyworld_pretrain` job: the project's own small Stable Diffusion, trained in SD's order.

  python -m spacetime_jax.main --config=configs/toyworld_pretrain.py --workdir=W

  dataset   the toy world's captioned images, rendered once    W/dataset/
  1. clip   text + vision towers, contrastive, world tokenizer W/clip/
  2. vae    KL autoencoder 64x64x3 <-> 8x8x4, scaling factor   W/vae/
            latent moments of every image, encoded once        W/vae/latent_moments.npz
  3. unet   conditioned on the frozen CLIP text tower          W/unet/
  export    diffusers-layout folder + CLIP vision tower        W/model/, W/model/image_encoder/
  validate  prompts x seeds grid, prompt-following score       W/grid.png,
                                                               W/model/pretrain_summary.json

A stage that finished wrote its results and then W/<stage>/done.json; a rerun on the same
workdir loads those and skips the stage, so an interrupted run resumes at the stage it was in,
and within it from the stage's newest checkpoint (W/<stage>/checkpoints, every
<stage>.checkpoint_every steps; each stage trains in training/loop.py's TrainingLoop, which
also saves a checkpoint and exits 143 on SIGTERM and stops on a non-finite loss). The summary,
written last, marks the whole job finished.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from spacetime_jax.data.latents import encode_moments
from spacetime_jax.diffusion.samplers import METHODS
from spacetime_jax.diffusion.schedules import PREDICTION_TYPES, SchedulerConfig
from spacetime_jax.errors import UserError
from spacetime_jax.models import pretrained
from spacetime_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from spacetime_jax.models.clip_vision import CLIPVisionConfig
from spacetime_jax.models.tokenizer import load_tokenizer, tokenize
from spacetime_jax.models.unet import UNetConfig
from spacetime_jax.models.vae import AutoencoderKL, VAEConfig
from spacetime_jax.pipelines.text_to_image import text_to_image
from spacetime_jax.toyworld import dataset as toy_dataset
from spacetime_jax.toyworld import world
from spacetime_jax.toyworld.captions import caption
from spacetime_jax.toyworld.denoising import format_scores, one_step_denoising
from spacetime_jax.toyworld.fidelity import read_shape, read_size
from spacetime_jax.toyworld.measure import measure_background_color, measure_object_color
from spacetime_jax.toyworld.pretrain_clip import train_clip
from spacetime_jax.toyworld.pretrain_unet import LatentTrainingSet, train_unet
from spacetime_jax.toyworld.pretrain_vae import train_vae
from spacetime_jax.toyworld.scene import COLORS, SIZES, Background, Scene
from spacetime_jax.toyworld.shapes import SHAPES
from spacetime_jax.training.progress import format_duration
from spacetime_jax.visualize import save_grid

DONE_FILE = "done.json"
SUMMARY_FILE = "pretrain_summary.json"
LATENTS_FILE = "latent_moments.npz"
WEIGHT_DTYPES = {"float16": np.float16, "float32": np.float32}
ENCODE_BATCH = 256
SCORE_SEED = 1234  # draws the scored prompts
HELD_OUT_WORLD_SEED = 99  # renders no stage trained on (the pretraining set is seed 0)


def log(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------------------
# Files: params, configs, stage markers.

def save_params(path: Path, params: Any) -> None:
    """A param tree as one safetensors file, keys joined with '/'."""
    flat = traverse_util.flatten_dict(params, sep="/")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()},
              str(path))


def load_params(path: Path) -> dict:
    return traverse_util.unflatten_dict(load_file(str(path)), sep="/")


def write_json(path: Path, data: Any) -> None:
    # Written beside and renamed: a marker is either complete or absent.
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def read_done(folder: Path) -> Optional[dict]:
    """The facts a finished stage recorded, or None when it has not finished."""
    marker = folder / DONE_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


# ---------------------------------------------------------------------------------------
# Stage 1: CLIP.

@dataclasses.dataclass(frozen=True)
class ClipTowers:
    text_config: CLIPTextConfig
    text_params: Any
    vision_config: CLIPVisionConfig
    vision_params: Any
    tokenizer_dir: Path


def load_clip_stage(folder: Path) -> ClipTowers:
    return ClipTowers(
        CLIPTextConfig.from_dict(json.loads((folder / "text_config.json").read_text())),
        load_params(folder / "text_params.safetensors"),
        CLIPVisionConfig.from_dict(json.loads((folder / "vision_config.json").read_text())),
        load_params(folder / "vision_params.safetensors"),
        folder / "tokenizer")


def run_clip_stage(folder: Path, images: np.ndarray, captions: list[str],
                   config: ml_collections.ConfigDict) -> dict:
    """Trains CLIP; writes the towers, the tokenizer (folder/tokenizer) and done.json."""
    start = time.perf_counter()
    result = train_clip(images, captions, config, folder, log=log)
    if Path(result.tokenizer_dir).resolve() != (folder / "tokenizer").resolve():
        raise AssertionError(f"CLIP stage wrote its tokenizer to {result.tokenizer_dir}, "
                             f"expected {folder / 'tokenizer'}")
    write_json(folder / "text_config.json", result.text_config.to_dict())
    save_params(folder / "text_params.safetensors", result.text_params)
    write_json(folder / "vision_config.json", result.vision_config.to_dict())
    save_params(folder / "vision_params.safetensors", result.vision_params)
    facts = {"steps": config.steps, "final_loss": result.final_loss,
             "heldout_loss_before": result.initial_held_out_loss,
             "heldout_loss_after": result.held_out_loss,
             "retrieval_accuracy": result.retrieval_accuracy,
             "shape_accuracy": result.shape_accuracy,
             "seconds": time.perf_counter() - start}
    write_json(folder / DONE_FILE, facts)
    return facts


# ---------------------------------------------------------------------------------------
# Stage 2: VAE, and the latent moments of every image.

def load_vae_stage(folder: Path) -> tuple[VAEConfig, Any]:
    config = VAEConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return config, load_params(folder / "params.safetensors")


def run_vae_stage(folder: Path, images: np.ndarray, masks: np.ndarray,
                  config: ml_collections.ConfigDict) -> dict:
    start = time.perf_counter()
    result = train_vae(images, masks, config, folder, log=log)
    write_json(folder / "config.json", result.config.to_dict())
    save_params(folder / "params.safetensors", result.params)
    facts = {"steps": config.steps, "final_loss": result.final_loss,
             "heldout_l1_before": result.heldout_l1_before,
             "heldout_l1_after": result.heldout_l1_after,
             "scaling_factor": result.config.scaling_factor,
             "heldout_reconstruction": result.heldout_report,
             "seconds": time.perf_counter() - start}
    write_json(folder / DONE_FILE, facts)
    return facts


def latent_moments(folder: Path, vae_config: VAEConfig, vae_params: Any,
                   images: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(means, logvars) of every image, from folder/latent_moments.npz or encoded now."""
    path = folder / LATENTS_FILE
    if path.is_file():
        with np.load(path) as cached:
            return cached["means"], cached["logvars"]
    start = time.perf_counter()
    pixels = images()
    means, logvars = encode_moments(AutoencoderKL(vae_config), jax.device_put(vae_params),
                                    pixels, batch_size=ENCODE_BATCH)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        np.savez(f, means=means, logvars=logvars)
    os.replace(partial, path)
    log(f"latents: {len(pixels)} images encoded in {time.perf_counter() - start:.0f}s")
    return means, logvars


# ---------------------------------------------------------------------------------------
# Text contexts from the frozen CLIP text tower.

def text_contexts(towers: ClipTowers, captions: list[str], batch_size: int = ENCODE_BATCH
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(contexts (U, 77, D) float16 of the U distinct captions, each caption's row (N,),
    the empty prompt's context (77, D) float16): SD's context, the last hidden state."""
    distinct, rows = np.unique(np.asarray(captions), return_inverse=True)
    ids = tokenize(load_tokenizer(towers.tokenizer_dir), list(distinct) + [""])
    model = CLIPTextTransformer(towers.text_config)
    encode = jax.jit(lambda params, ids: model.apply({"params": params}, ids).last_hidden_state)
    params = jax.device_put(towers.text_params)
    chunks = []
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        padding = batch_size - len(batch)
        padded = np.concatenate([batch, np.repeat(batch[-1:], padding, axis=0)])
        chunks.append(np.asarray(encode(params, padded)[:len(batch)], np.float16))
    contexts = np.concatenate(chunks)
    return contexts[:-1], rows.astype(np.int32), contexts[-1]


# ---------------------------------------------------------------------------------------
# Stage 3: U-Net.

def load_unet_stage(folder: Path) -> tuple[UNetConfig, Any]:
    config = UNetConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return config, load_params(folder / "params.safetensors")


def run_unet_stage(folder: Path, data: LatentTrainingSet, scaling_factor: float,
                   config: ml_collections.ConfigDict) -> dict:
    start = time.perf_counter()
    result = train_unet(data, scaling_factor, config, folder, log=log)
    write_json(folder / "config.json", result.config.to_dict())
    save_params(folder / "params.safetensors", result.params)
    facts = {"steps": config.steps, "final_loss": result.final_loss,
             "heldout_loss_before": result.heldout_loss_before,
             "heldout_loss_after": result.heldout_loss_after,
             "seconds": time.perf_counter() - start}
    write_json(folder / DONE_FILE, facts)
    return facts


# ---------------------------------------------------------------------------------------
# Export and validation.

def export_model(out: Path, towers: ClipTowers, vae: tuple[VAEConfig, Any],
                 unet: tuple[UNetConfig, Any], weight_dtype: str,
                 prediction_type: str = "epsilon") -> Path:
    dtype = WEIGHT_DTYPES[weight_dtype]
    pretrained.save_stable_diffusion(
        out, unet_config=unet[0], unet_params=unet[1], vae_config=vae[0], vae_params=vae[1],
        text_config=towers.text_config, text_params=towers.text_params,
        tokenizer_dir=towers.tokenizer_dir,
        scheduler_config=SchedulerConfig(prediction_type=prediction_type),
        weight_dtype=dtype)
    pretrained.save_clip_vision(out / "image_encoder", towers.vision_config,
                                towers.vision_params, weight_dtype=dtype)
    return out


class ScoredPrompt(NamedTuple):
    """A prompt in the captions' own words and what it asks for."""
    prompt: str
    color: str  # the object's
    background: str
    shape: str
    size: str


def scored_prompts(n: int, seed: int = SCORE_SEED) -> list[ScoredPrompt]:
    """n prompts for a plain object of a random shape, size and color on a plain background of
    another color."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        shape = str(rng.choice(list(SHAPES)))
        size = str(rng.choice(list(SIZES)))
        color, background = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
        scene = Scene(shape, color, size, (0.5, 0.5), Background("plain", background))
        prompts.append(ScoredPrompt(caption(scene), color, background, shape, size))
    return prompts


def prompt_following(images: np.ndarray, prompts: list[ScoredPrompt]) -> dict[str, np.ndarray]:
    """Per image, whether its measured background, object color, shape and size are the
    prompted ones (bool arrays; chance 1/8, 1/8, 1/9 and 1/3)."""
    return {
        "background": np.array([measure_background_color(im) == p.background
                                for im, p in zip(images, prompts)]),
        "color": np.array([measure_object_color(im) == p.color for im, p in zip(images, prompts)]),
        "shape": np.array([read_shape(im) == p.shape for im, p in zip(images, prompts)]),
        "size": np.array([read_size(im, p.shape) == p.size for im, p in zip(images, prompts)]),
    }


def validate(model_dir: Path, config: ml_collections.ConfigDict, grid_path: Path) -> dict:
    """Samples the exported model, loaded back as users load it: the grid (prompts x seeds)
    and the prompt-following score, in one batch (one compilation)."""
    s = config.sample
    sd = pretrained.load_stable_diffusion(model_dir)
    log(pretrained.model_summary(sd))
    grid_prompts = [p for p in s.prompts for _ in s.seeds]
    grid_seeds = [seed for _ in s.prompts for seed in s.seeds]
    scored = scored_prompts(s.num_scored)
    start = time.perf_counter()
    images = text_to_image(sd, grid_prompts + [p.prompt for p in scored],
                           grid_seeds + [100 + i for i in range(len(scored))],
                           num_steps=s.steps, guidance_scale=s.guidance_scale, method=s.sampler)
    seconds = time.perf_counter() - start
    save_grid(grid_path, images[:len(grid_prompts)], rows=len(s.prompts), cols=len(s.seeds),
              row_labels=list(s.prompts), col_labels=[f"seed {x}" for x in s.seeds],
              title=f"the pretrained toy-world model: prompts x seeds "
                    f"{', '.join(map(str, s.seeds))}; {s.steps} {s.sampler} steps, guidance "
                    f"{s.guidance_scale:g}")
    hits = prompt_following(images[len(grid_prompts):], scored)
    score = {"samples": len(scored),
             "background_color_accuracy": float(hits["background"].mean()),
             "object_color_accuracy": float(hits["color"].mean()),
             "shape_accuracy": float(hits["shape"].mean()),
             "size_accuracy": float(hits["size"].mean()),
             "chance": 1.0 / len(COLORS), "steps": s.steps, "guidance_scale": s.guidance_scale,
             "sampler": s.sampler, "seconds": seconds}
    log(f"validate: {len(images)} images in {seconds:.0f}s -> {grid_path}; prompt following "
        f"on {len(scored)} samples: background color {score['background_color_accuracy']:.2f}, "
        f"object color {score['object_color_accuracy']:.2f}, shape "
        f"{score['shape_accuracy']:.2f}, size {score['size_accuracy']:.2f}")
    if s.num_denoised:
        # Ranks short trials, which all score near chance on shape (toyworld/denoising.py).
        renders = world.generate(HELD_OUT_WORLD_SEED, s.num_denoised, size=config.data.image_size)
        denoised = one_step_denoising(sd, renders)
        score["one_step_denoising"] = [d._asdict() for d in denoised]
        log(f"validate: one step of denoising, {s.num_denoised} held-out renders: "
            f"{format_scores(denoised)}")
    return score


# ---------------------------------------------------------------------------------------
# The job.

def check_config(config: ml_collections.ConfigDict) -> None:
    if config.export.weight_dtype not in WEIGHT_DTYPES:
        raise UserError(f"export.weight_dtype={config.export.weight_dtype!r} is unknown; use "
                        f"one of {sorted(WEIGHT_DTYPES)}")
    if config.sample.sampler not in METHODS:
        raise UserError(f"sample.sampler={config.sample.sampler!r} is unknown; use one of "
                        f"{METHODS}")
    if config.unet.prediction_type not in PREDICTION_TYPES:
        raise UserError(f"unet.prediction_type={config.unet.prediction_type!r} is unknown; use "
                        f"one of {PREDICTION_TYPES}")
    if config.unet.timestep_logit_std < 0:
        raise UserError(f"unet.timestep_logit_std={config.unet.timestep_logit_std} is "
                        f"negative; use 0 (uniform timesteps) or a positive spread")
    if config.clip.width % config.clip.heads:
        raise UserError(f"clip.width={config.clip.width} is not a multiple of "
                        f"clip.heads={config.clip.heads}")
    groups = config.clip.groups_per_batch
    if groups < 0 or (groups and config.clip.batch_size % groups):
        raise UserError(f"clip.groups_per_batch={groups} must be 0 (random batches) or divide "
                        f"clip.batch_size={config.clip.batch_size}")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    check_config(config)
    start = time.perf_counter()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    summary_path = model_dir / SUMMARY_FILE
    stage_dirs = {name: work / name for name in ("clip", "vae", "unet")}

    @functools.cache
    def data() -> toy_dataset.PretrainingSet:
        d = config.data
        return toy_dataset.load_or_render(work / "dataset", d.num_examples, d.seed,
                                          d.image_size, d.processes, log=log)

    def stage(name: str, train: Callable[[], dict]) -> dict:
        facts = read_done(stage_dirs[name])
        if facts is not None:
            log(f"{name}: finished earlier ({stage_dirs[name]}), skipped")
            return facts
        log(f"{name}: training")
        facts = train()
        log(f"{name}: finished in {format_duration(facts['seconds'])}")
        return facts

    # --- stage 1: CLIP
    facts = {"clip": stage("clip", lambda: run_clip_stage(
        stage_dirs["clip"], data().images, data().captions, config.clip))}
    towers = load_clip_stage(stage_dirs["clip"])

    # --- stage 2: VAE
    facts["vae"] = stage("vae", lambda: run_vae_stage(stage_dirs["vae"], data().images,
                                                      data().masks, config.vae))
    vae = load_vae_stage(stage_dirs["vae"])

    # --- stage 3: U-Net on cached latent moments and text contexts
    def train_unet_stage() -> dict:
        means, logvars = latent_moments(stage_dirs["vae"], *vae, lambda: data().images)
        contexts, rows, empty = text_contexts(towers, data().captions)
        log(f"contexts: {len(contexts)} distinct captions encoded by the frozen text tower")
        training_set = LatentTrainingSet(means, logvars, rows, contexts, empty)
        return run_unet_stage(stage_dirs["unet"], training_set, vae[0].scaling_factor,
                              config.unet)

    facts["unet"] = stage("unet", train_unet_stage)

    # --- export and validation
    if summary_path.is_file():
        log(f"export and validation: finished earlier ({summary_path}), skipped")
        summary = json.loads(summary_path.read_text())
    else:
        export_model(model_dir, towers, vae, load_unet_stage(stage_dirs["unet"]),
                     config.export.weight_dtype, config.unet.prediction_type)
        log(f"export: {model_dir} (weights {config.export.weight_dtype}), CLIP vision tower "
            f"in {model_dir / 'image_encoder'}")
        summary = {"stages": facts, "validation": validate(model_dir, config, work / "grid.png"),
                   "weight_dtype": config.export.weight_dtype,
                   "config": json.loads(config.to_json())}
        write_json(summary_path, summary)
    stage_seconds = sum(f["seconds"] for f in summary["stages"].values())
    stage_times = ", ".join(f"{name} {format_duration(f['seconds'])}"
                            for name, f in summary["stages"].items())
    score = summary["validation"]
    log(f"toyworld_pretrain: model in {model_dir}; prompted background color "
        f"{score['background_color_accuracy']:.2f}, object color "
        f"{score['object_color_accuracy']:.2f}, shape {score.get('shape_accuracy', 0):.2f}, "
        f"size {score.get('size_accuracy', 0):.2f}; stages took {format_duration(stage_seconds)} "
        f"({stage_times}), this run {format_duration(time.perf_counter() - start)}")
