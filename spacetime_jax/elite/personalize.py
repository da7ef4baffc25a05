"""The `elite_personalize` job: every input image -> words (and local tokens) in one batched
encoder pass, then each (image, prompt, seed, lambda) drawn by the frozen Stable Diffusion.

Reads top to bottom: the settings, the encoder folder, the images and masks (all read and
checked before the model loads, so a bad file costs seconds), the model the encoder names,
the encoder pass (timed without its compilation), the generation in fixed-size batches (one
compiled shape), and the outputs (a grid per image, one PNG per row, summary.json).

Images and masks are brought to WORKING_SIZE squares without a crop, as the reference resizes
its inputs to 512 before CLIP's own resize; the encoder then takes its 224 px (toy world: 64 px)
view from there. The local branch sees image x mask at that size, as the reference multiplies
at full size before resizing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util
from PIL import Image

from spacetime_jax.data.images import (find_image_files, read_upright, square, to_gray,
                                       to_rgb)
from spacetime_jax.diffusion.samplers import METHODS
from spacetime_jax.elite.artifact import (ENCODER_DIR, EncoderArtifact, image_encoder_source,
                                          load_encoder)
from spacetime_jax.elite.conditioning import format_prompts
from spacetime_jax.elite.params import (LOCAL_NAMES, cross_attention_kernel_paths,
                                        differing_paths)
from spacetime_jax.elite.sample import (EliteModel, EncoderParams, check_lambda, encode_images,
                                        generate, load_model)
from spacetime_jax.errors import UserError
from spacetime_jax.models.tokenizer import warn_unknown_words
from spacetime_jax.paths import as_path
from spacetime_jax.pipelines.sample_job import compute_dtype
from spacetime_jax.training.progress import track
from spacetime_jax.visualize import save_grid, save_png

WORKING_SIZE = 512
DEFAULT_PLACEHOLDER = "S"  # any single token works: the words replace it
ALL_WORDS = "all"
# A mask may be a scaled copy of its image: aspect ratios within 1% (rounding of the sides).
ASPECT_TOLERANCE = 0.01
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class Subject:
    """One input image, read and checked."""
    path: epath.Path
    mask_path: Optional[epath.Path]    # None: the whole image is the object
    image: np.ndarray                  # uint8 (WORKING_SIZE, WORKING_SIZE, 3)
    mask: np.ndarray                   # float32 (WORKING_SIZE, WORKING_SIZE, 1) in {0, 1}

    @property
    def stem(self) -> str:
        return self.path.stem


@dataclasses.dataclass(frozen=True)
class Row:
    """One generated image: subject `image` in prompt `prompt` from `seed` at lambda `scale`
    (None: the global words alone)."""
    image: int
    prompt: int
    seed: int
    scale: Optional[float]


# ---------------------------------------------------------------------------------------
# Settings.

def parse_token_index(text: str, num_words: int) -> Optional[int]:
    """"0".."num_words-1" -> that word alone; "all" -> None (every word)."""
    text = str(text).strip()
    if text == ALL_WORDS:
        return None
    if not text.isdigit() or int(text) >= num_words:
        raise UserError(f"token_index={text!r} must be 0 (the primary word) or {ALL_WORDS!r} "
                        f"(all {num_words} words); 1..{num_words - 1} pick one auxiliary word")
    return int(text)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, (float, np.floating))


def check_settings(config) -> None:
    """Everything checkable before a file is opened."""
    if not config.encoder:
        raise UserError("encoder is not set: --config.encoder=FOLDER (an ELITE training workdir "
                        "or its encoder/ folder)")
    if not config.images:
        raise UserError("images is not set: --config.images=FILE_OR_FOLDER")
    if not config.prompts:
        raise UserError("prompts is empty: give at least one, e.g. "
                        "--config.prompts='(\"a photo of a {} on the beach\",)'")
    format_prompts(config.prompts, DEFAULT_PLACEHOLDER)
    if not config.seeds:
        raise UserError("seeds is empty: give at least one, e.g. --config.seeds='(42,)'")
    if not all(_is_int(s) for s in config.seeds):
        raise UserError(f"seeds {tuple(config.seeds)} must be whole numbers, e.g. (42, 43)")
    for scale in config.local_scales:
        if not _is_number(scale):
            raise UserError(f"local_scales {tuple(config.local_scales)} must be numbers "
                            "(lambdas), e.g. (0.6, 0.8)")
        check_lambda(float(scale))
    if config.sampler not in METHODS:
        raise UserError(f"sampler={config.sampler!r} is unknown; use one of {METHODS}")
    if config.steps < 1:
        raise UserError(f"steps={config.steps} must be at least 1")
    if config.batch_size < 1:
        raise UserError(f"batch_size={config.batch_size} must be at least 1")
    if not np.isfinite(config.guidance_scale):
        raise UserError(f"guidance_scale={config.guidance_scale} must be a finite number")
    compute_dtype(config.compute_dtype)


def encoder_folder(path: str | os.PathLike) -> epath.Path:
    """A training workdir (its encoder/) or an encoder folder, local or gs://."""
    folder = as_path(path).expanduser()
    if (folder / ENCODER_DIR / "encoder.json").is_file():
        return folder / ENCODER_DIR
    return folder


def local_scales(config, artifact: EncoderArtifact) -> list[Optional[float]]:
    """The lambdas to draw; [None] (the global words alone) for a global-only encoder."""
    if artifact.local_params is None:
        return [None]
    if not config.local_scales:
        raise UserError("local_scales is empty: give at least one lambda, e.g. "
                        "--config.local_scales='(0.6,)' (0 turns the local branch off)")
    return [float(s) for s in config.local_scales]


# ---------------------------------------------------------------------------------------
# Images and masks.

def image_paths(images: str | os.PathLike) -> list[epath.Path]:
    """One image file, or the image files of a folder (sorted by name); local or gs://."""
    path = as_path(images).expanduser()
    if not path.exists():
        raise UserError(f"images {path} does not exist (give an image file or a folder of them)")
    if path.is_file():
        return [path]
    listing = find_image_files(path)
    if listing.ignored:
        print(f"ignored in {path} (not images): {', '.join(listing.ignored)}", flush=True)
    by_stem: dict[str, epath.Path] = {}
    for p in listing.paths:
        if p.stem in by_stem:
            raise UserError(f"images {by_stem[p.stem].name} and {p.name} in {path} share the "
                            f"name {p.stem!r}: outputs are named by it; rename one")
        by_stem[p.stem] = p
    return listing.paths


def mask_paths(masks: str | os.PathLike,
               images: Sequence[epath.Path]) -> list[Optional[epath.Path]]:
    """Each image's mask: none, the one mask file, or the file of the masks folder with the
    image's stem."""
    if not masks:
        return [None] * len(images)
    path = as_path(masks).expanduser()
    if not path.exists():
        raise UserError(f"masks {path} does not exist (give a mask file, a folder of masks "
                        "named like the images, or leave masks empty to use whole images)")
    if path.is_file():
        if len(images) != 1:
            raise UserError(f"masks {path} is one file for {len(images)} images: give a folder "
                            "with one mask per image, named like the image (cat.jpg <- cat.png)")
        return [path]
    by_stem: dict[str, epath.Path] = {}
    for p in find_image_files(path).paths:
        if p.stem in by_stem:
            raise UserError(f"masks {by_stem[p.stem].name} and {p.name} in {path} are both "
                            f"named {p.stem!r}: keep one mask per image")
        by_stem[p.stem] = p
    missing = [image.name for image in images if image.stem not in by_stem]
    if missing:
        raise UserError(f"no mask in {path} for {', '.join(missing)}: each image needs a mask "
                        f"with its name (e.g. {as_path(missing[0]).stem}.png)")
    return [by_stem[image.stem] for image in images]


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file -> bool (H, W) upright: white (> 127) is the object; a 0/1 label map's 1s.
    Raises ImageError naming the file (data/images.py's opener)."""
    gray = np.asarray(to_gray(read_upright(path, "mask")))
    return gray >= 1 if gray.max() <= 1 else gray > 127


def fit_mask(mask: np.ndarray, mask_path: epath.Path, image_path: epath.Path,
             image_size: tuple[int, int], size: int) -> np.ndarray:
    """The mask on the image's (size, size) square: float32 (size, size, 1) in {0, 1}."""
    mask_height, mask_width = mask.shape
    width, height = image_size
    if abs(mask_width * height - mask_height * width) > ASPECT_TOLERANCE * mask_height * width:
        raise UserError(f"mask {mask_path} is {mask_width}x{mask_height} but image "
                        f"{image_path.name} is {width}x{height}: a mask must have its image's "
                        "aspect ratio (the same size or a scaled copy)")
    if not mask.any():
        raise UserError(f"mask {mask_path} is empty (no white pixel): white marks the object; "
                        "leave masks empty to use the whole image")
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size),
                                                                   Image.Resampling.NEAREST)
    fitted = (np.asarray(resized) > 127).astype(np.float32)[..., None]
    if not fitted.any():
        raise UserError(f"mask {mask_path}: the object is too small to survive the resize to "
                        f"{size} px; draw it larger or crop the image around it")
    return fitted


def load_subjects(config) -> list[Subject]:
    """Every image and mask read and checked; the first bad file stops the run."""
    paths = image_paths(config.images)
    masks = mask_paths(config.masks, paths)
    subjects = []
    for path, mask_path in zip(paths, masks):
        upright = to_rgb(read_upright(path))
        image = square(upright, WORKING_SIZE)
        if mask_path is None:
            mask = np.ones((WORKING_SIZE, WORKING_SIZE, 1), np.float32)
        else:
            mask = fit_mask(read_mask(mask_path), mask_path, path, upright.size, WORKING_SIZE)
        subjects.append(Subject(path=path, mask_path=mask_path, image=image, mask=mask))
    return subjects


# ---------------------------------------------------------------------------------------
# The model and the encoder.

def load_personalization_model(config, artifact: EncoderArtifact) -> EliteModel:
    """The model the encoder names (or the config's override), built for its stages."""
    trained = artifact.extra.get("train_config") or {}
    model_config = ml_collections.ConfigDict({
        "model": config.model or artifact.base_model,
        # The revision the encoder was trained on, unless the model or revision is overridden.
        "model_revision": config.model_revision or ("" if config.model else
                                                    trained.get("model_revision", "")),
        # The tower the encoder was trained on, also when the diffusion model is overridden.
        "image_encoder": config.image_encoder or image_encoder_source(artifact),
        "compute_dtype": config.compute_dtype,
        "placeholder": artifact.extra.get("placeholder") or DEFAULT_PLACEHOLDER,
        "encoder": {"feature_layers": tuple(artifact.config.feature_layers),
                    "hidden_width": artifact.config.hidden_width},
    })
    model = load_model(model_config, local_branch=artifact.local_params is not None)
    if model.encoder_config != artifact.config:
        raise UserError(f"encoder {config.encoder} was made for {artifact.config}, but model "
                        f"{model_config.model} with image encoder {model_config.image_encoder} "
                        f"gives {model.encoder_config}: use the encoder's own model")
    check_kv_fits(artifact, model, model_config.model)
    return model


def check_kv_fits(artifact: EncoderArtifact, model: EliteModel, model_name: str) -> None:
    """The encoder's K/V kernels are the U-Net's attn2 projections, path for path and shape
    for shape (another U-Net would otherwise get stray params or a shape error deep inside)."""
    unet = traverse_util.flatten_dict(model.sd.unet_params)
    kernels = {path: np.shape(unet[path]) for path in cross_attention_kernel_paths(
        model.sd.unet_params)}
    stages = [("global", artifact.global_params, kernels)]
    if artifact.local_params is not None:
        local = {path[:-2] + (LOCAL_NAMES[path[-2]], "kernel"): shape
                 for path, shape in kernels.items()}
        stages.append(("local", artifact.local_params, local))
    for stage, params, want in stages:
        have = {path: np.shape(v) for path, v in traverse_util.flatten_dict(params["kv"]).items()}
        if have != want:
            wrong = differing_paths(want, have)
            raise UserError(f"the encoder's {stage} K/V copies do not fit {model_name}'s U-Net "
                            f"(differing: {wrong[:4]}): use the model it was trained on")


def encoder_params(artifact: EncoderArtifact) -> EncoderParams:
    local = artifact.local_params
    return EncoderParams(global_mapper=artifact.global_params["mapper"],
                         global_kv=artifact.global_params["kv"],
                         local_mapper=None if local is None else local["mapper"],
                         local_kv=None if local is None else local["kv"])


def encode_timed(model: EliteModel, params: EncoderParams, images: np.ndarray,
                 masks: np.ndarray):
    """(words, tokens, seconds): the second of two identical passes is timed, so the
    seconds are the encoder's, not its compilation's."""
    jax.block_until_ready(encode_images(model, params, images, masks))
    start = time.perf_counter()
    words, tokens = jax.block_until_ready(encode_images(model, params, images, masks))
    return words, tokens, time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# Generation.

def plan_rows(num_images: int, num_prompts: int, seeds: Sequence[int],
              scales: Sequence[Optional[float]]) -> list[Row]:
    return [Row(image=i, prompt=p, seed=int(s), scale=scale) for scale in scales
            for i in range(num_images) for p in range(num_prompts) for s in seeds]


def batches(rows: Sequence[Row], batch_size: int) -> list[list[Row]]:
    """Rows of one lambda per batch (it is one scalar of a generate call), in order."""
    out: list[list[Row]] = []
    for row in rows:
        if out and len(out[-1]) < batch_size and out[-1][0].scale == row.scale:
            out[-1].append(row)
        else:
            out.append([row])
    return out


def pad(batch: Sequence[Row], size: int) -> list[Row]:
    """Repeats the last row: every call then has one shape and compiles once."""
    return list(batch) + [batch[-1]] * (size - len(batch))


def scale_name(scale: Optional[float]) -> str:
    return "global" if scale is None else f"l{scale:g}"


def row_file(subject: Subject, row: Row) -> str:
    return f"{subject.stem}/{row.prompt}_{row.seed}_{scale_name(row.scale)}.png"


def generate_rows(model: EliteModel, params: EncoderParams, subjects: Sequence[Subject],
                  rows: Sequence[Row], words, tokens, prompts: Sequence[str], config,
                  token_index: Optional[int], workdir: epath.Path) -> dict[Row, np.ndarray]:
    """Every row drawn in batches of config.batch_size; each image is written as it comes."""
    images = np.stack([s.image for s in subjects])
    masks = np.stack([s.mask for s in subjects])
    size = min(config.batch_size, len(rows))
    planned = batches(rows, size)
    out: dict[Row, np.ndarray] = {}
    for batch in track(planned, "sampling", unit="batch"):
        padded = pad(batch, size)
        index = np.array([r.image for r in padded])
        drawn = generate(model, params, images[index], masks[index],
                         [prompts[r.prompt] for r in padded], [r.seed for r in padded],
                         local_scale=batch[0].scale, token_index=token_index,
                         num_steps=config.steps, guidance_scale=config.guidance_scale,
                         method=config.sampler, words=words[index],
                         tokens=None if tokens is None else tokens[index])
        for row, image in zip(batch, drawn):
            out[row] = image
            save_png(workdir / row_file(subjects[row.image], row), image)
    return out


# ---------------------------------------------------------------------------------------
# Outputs.

def write_grid(workdir: epath.Path, subject: Subject, index: int,
               drawn: dict[Row, np.ndarray], prompts: Sequence[str], seeds: Sequence[int],
               scales: Sequence[Optional[float]]) -> epath.Path:
    """Rows: prompts (their placeholder filled in); columns: the input image, then each
    seed x lambda; a title naming the image and the seeds."""
    first = next(iter(drawn.values()))
    resolution = first.shape[0]
    source = np.asarray(Image.fromarray(subject.image).resize(
        (resolution, resolution), Image.Resampling.BICUBIC))
    tiles = []
    for p in range(len(prompts)):
        tiles.append(source)
        tiles.extend(drawn[Row(image=index, prompt=p, seed=int(s), scale=scale)]
                     for s in seeds for scale in scales)
    labels = ["input"] + [f"seed {s}" + ("" if scale is None else f" l={scale:g}")
                          for s in seeds for scale in scales]
    kinds = "seeds" if scales == [None] else "seeds x lambda"
    return save_grid(workdir / f"{subject.stem}.png", np.stack(tiles), rows=len(prompts),
                     cols=len(labels), row_labels=list(prompts), col_labels=labels,
                     title=f"ELITE: {subject.path.name}, prompts x {kinds} (seeds "
                           f"{', '.join(map(str, seeds))})")


def run(config, workdir: str | os.PathLike) -> None:
    workdir = as_path(workdir)
    check_settings(config)
    folder = encoder_folder(config.encoder)
    artifact = load_encoder(folder)
    scales = local_scales(config, artifact)
    token_index = parse_token_index(config.token_index, artifact.config.num_words)
    placeholder = artifact.extra.get("placeholder") or DEFAULT_PLACEHOLDER
    prompts = format_prompts(config.prompts, placeholder)
    subjects = load_subjects(config)
    print(f"{len(subjects)} image(s): " + ", ".join(
        s.path.name + (f" (mask {s.mask_path.name})" if s.mask_path else " (whole image)")
        for s in subjects), flush=True)
    if artifact.local_params is None:
        print(f"global-only encoder: local_scales {tuple(config.local_scales)} are ignored; "
              "one column per seed", flush=True)

    model = load_personalization_model(config, artifact)
    model.text.encode_prompts(prompts)  # a prompt too long for the text encoder fails now
    warn_unknown_words(model.text.tokenizer, config.prompts, "prompts",
                       config.model or artifact.base_model)
    params = encoder_params(artifact)
    words, tokens, encode_seconds = encode_timed(
        model, params, np.stack([s.image for s in subjects]),
        np.stack([s.mask for s in subjects]))
    per_image = encode_seconds / len(subjects)
    print(f"encoded {len(subjects)} image(s) in one pass: {encode_seconds:.3f} s, "
          f"{per_image:.4f} s per image (compilation excluded)", flush=True)

    rows = plan_rows(len(subjects), len(prompts), config.seeds, scales)
    print(f"generating {len(rows)} images: {len(subjects)} image(s) x {len(prompts)} prompt(s) "
          f"x {len(config.seeds)} seed(s) x {len(scales)} lambda(s), batch "
          f"{min(config.batch_size, len(rows))}, {config.steps} {config.sampler} steps",
          flush=True)
    start = time.perf_counter()
    drawn = generate_rows(model, params, subjects, rows, words, tokens, prompts, config,
                          token_index, workdir)
    generate_seconds = time.perf_counter() - start
    grids = [write_grid(workdir, s, i, drawn, prompts, config.seeds, scales)
             for i, s in enumerate(subjects)]
    summary = {
        "encoder": str(folder),
        "has_local": artifact.local_params is not None,
        "encode_seconds": encode_seconds,
        "encode_seconds_per_image": per_image,
        "generate_seconds": generate_seconds,
        "images": [{"file": str(s.path), "mask": str(s.mask_path) if s.mask_path else None,
                    "grid": str(g.name)} for s, g in zip(subjects, grids)],
        "rows": [{"image": subjects[r.image].stem, "prompt_index": r.prompt,
                  "prompt": config.prompts[r.prompt], "seed": r.seed, "local_scale": r.scale,
                  "file": row_file(subjects[r.image], r)} for r in rows],
        "local_scales": None if scales == [None] else scales,
        "note": ("global-only encoder: local_scales ignored" if scales == [None] else ""),
        "settings": config.to_dict(),
    }
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(rows)} images in {generate_seconds:.1f} s (compilation included) -> "
          f"{workdir}/<image>.png, {workdir}/<image>/, {workdir / SUMMARY_FILE}", flush=True)
