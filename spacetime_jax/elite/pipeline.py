"""ELITE's input pipeline: deterministic, resumable batches with the method's augmentations.

A batch is a pure function of (spec, step, process_index, process_count): there is no iterator
state to save, so the training step counter is the whole pipeline state and a run resumed at
step s draws exactly what an uninterrupted run draws there.

Row -> example: global row r of step s is draw number k = s * G + r of an endless sequence of
epochs; epoch e = k // N visits the N examples in the order of
`np.random.default_rng([seed, e]).permutation(N)`. Each row's augmentation randomness comes from
`np.random.default_rng([seed, step, r])`, keyed by the global row number, so the batch does not
depend on how many processes build it: process p of P builds rows [p G/P, (p+1) G/P).

The source is any random-access `src` (len(src), src[i] -> {"image": (S, S, 3) uint8, "mask":
(S, S, 1) uint8 0/255}): an object crop and, for the local stage, its segmentation mask.

Stage "global" (the global mapper), per row:
  pixels (R, R, 3) float32 in [-1, 1]: the crop resized to the diffusion resolution R;
  clip_pixels (C, C, 3): CLIP-normalized image-encoder input, augmented as the reference does
    with albumentations (resize, flip, rotate, blur, elastic; see `augment_for_clip`);
  input_ids (L,) int32, placeholder_position () int32: a template through `encode_prompt`;
  example_index () int32: which example of `src` the row holds.
Stage "local" (the local mapper), per row:
  pixels (R, R, 3) in [-1, 1] and valid_mask (R, R, 1) float32 0/1: the randomly rescaled
    diffusion target (see `rescale_target`), its prompt prefixed by the scale's words;
  clip_pixels (C, C, 3): the unaugmented crop, CLIP-normalized (the global branch's input);
  local_pixels (C, C, 3), local_mask (C, C, 1) float32 0/1: crop x mask and the mask under one
    shared random geometric augmentation (see `augment_object`), CLIP-normalized;
  input_ids, placeholder_position, example_index as above.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import queue
import threading
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from spacetime_jax.data.templates import OBJECT_TEMPLATES
from spacetime_jax.errors import UserError
from spacetime_jax.models.clip_vision import CLIP_MEAN, CLIP_STD

STAGES = ("global", "local")
MIN_SIZE = 8  # pixels: the smallest rescaled target is a third of the side
Batch = dict[str, np.ndarray]
EncodePrompt = Callable[[str], tuple[Any, Any]]

# Caption words of the local stage's rescaled target (the reference's, from Custom Diffusion).
SMALL_PREFIXES = ("a far away", "very small")
LARGE_PREFIXES = ("zoomed in", "close up")
# Leading words a prefix replaces: "the photo of a {}" -> "very small photo of a {}".
ARTICLES = ("a", "an", "the")

# Rescale of the local stage's diffusion target. As in the reference: with p = 2/3 a side in
# [R/3, R], else in [1.2 R, 1.4 R), made even; only sides below 0.6 R are pasted small on black,
# sides in [0.6 R, R] are a plain resize to R (the reference's `else` branch), sides above R are
# cropped back to R.
SMALL_SCALE_PROBABILITY = 2 / 3
PASTE_BELOW = 0.6
LARGE_SCALE_RANGE = (1.2, 1.4)

# Image-encoder augmentation of the global stage, p as in the reference. Geometry is in pixels
# of the encoder input C and scales with C (reference values at C = 224).
FLIP_P = 0.5
ROTATE_P, ROTATE_DEGREES = 0.5, 20.0
BLUR_P = 0.3
# The standard deviations of the reference's blur (albumentations Blur: a 3..7 px box kernel,
# std sqrt((k^2 - 1) / 12)) as a Gaussian's sigma range.
BLUR_SIGMA_AT_224 = (0.8, 2.0)
ELASTIC_P = 0.3
# A smooth random displacement field: uniform noise low-passed by a Gaussian of width C/16
# (14 px at 224) and scaled to an rms displacement of C/56 (4 px at 224): a gentle wobble
# that keeps the object recognisable.
ELASTIC_SMOOTHING = 1 / 16
ELASTIC_RMS = 1 / 56

# Local-stage object augmentation (the reference's `aug_cv2`), each step with p = 0.5.
OBJECT_STEP_P = 0.5
OBJECT_UPSCALE = 256 / 224  # resize to C .. C * 256/224, then a random C x C crop
OBJECT_ROTATE_DEGREES = 30
OBJECT_TRANSLATE_AT_224 = 60


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """What the batches look like.

    stage: "global" or "local". global_batch: rows per step over all processes (G).
    resolution: diffusion pixels R (toy world 64, SD 512). clip_size: image-encoder input C
    (toy world 64, SD 224). encode_prompt(text) -> (ids (L,), placeholder position): the
    tokenizer, which finds the placeholder by its token id. placeholder: the word that replaces
    "{}" in the templates (must be what encode_prompt looks for). seed: of the example order and
    of every augmentation.
    """
    stage: str
    global_batch: int
    resolution: int
    clip_size: int
    encode_prompt: EncodePrompt
    placeholder: str = "S"
    seed: int = 0
    templates: tuple[str, ...] = OBJECT_TEMPLATES

    def __post_init__(self):
        if self.stage not in STAGES:
            raise UserError(f"unknown ELITE stage {self.stage!r}: use one of {STAGES}")
        for name, least in (("global_batch", 1), ("resolution", MIN_SIZE),
                            ("clip_size", MIN_SIZE)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < least:
                raise UserError(f"pipeline {name} must be an integer >= {least}, got {value!r}")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise UserError(f"pipeline seed must be a non-negative integer, got {self.seed!r}")
        if not self.templates:
            raise UserError("pipeline templates are empty: give at least one prompt template")
        for template in self.templates:
            if template.count("{}") != 1:
                raise UserError(f"prompt template {template!r} must hold exactly one '{{}}' "
                                "where the placeholder goes")
        if self.placeholder.split() != [self.placeholder] or "{" in self.placeholder:
            raise UserError(f"placeholder {self.placeholder!r} must be one non-empty word")


# --- which example each row holds ---------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.setflags(write=False)  # shared through the cache
    return order


def global_batch_rows(step: int, num_examples: int, global_batch: int, seed: int) -> np.ndarray:
    """Example indices (G,) int64 of the G global rows of `step`, epoch by epoch."""
    if num_examples < 1:
        raise UserError("the ELITE data set is empty: build it with at least one example")
    if step < 0:
        raise UserError(f"pipeline step must be >= 0, got {step}")
    draws = step * global_batch + np.arange(global_batch, dtype=np.int64)
    epochs, positions = np.divmod(draws, num_examples)
    rows = np.empty(global_batch, np.int64)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        rows[here] = _epoch_order(seed, int(epoch), num_examples)[positions[here]]
    return rows


def host_rows(global_batch: int, process_index: int, process_count: int) -> range:
    """The global row numbers process `process_index` of `process_count` builds."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in 0..{process_count - 1} "
                        f"(process_count {process_count})")
    if global_batch % process_count:
        raise UserError(f"global batch {global_batch} is not divisible by the {process_count} "
                        "processes: use a multiple of the process count")
    per_host = global_batch // process_count
    return range(process_index * per_host, (process_index + 1) * per_host)


def row_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """The generator of one global row's randomness (template, scale, augmentation)."""
    return np.random.default_rng([seed, step, row])


# --- prompts -------------------------------------------------------------------------------

def prompt_with_prefix(template: str, prefix: Optional[str]) -> str:
    """The template with a scale prefix: it replaces a leading article, else goes in front.

    "a photo of a {}" + "very small" -> "very small photo of a {}"; "the photo of a {}" +
    "zoomed in" -> "zoomed in photo of a {}". No prefix keeps the template as written (the
    reference's prefix "a" did the same to its templates starting with "a", and dropped the
    first letter of every other one: "ahe photo of a {}").
    """
    if prefix is None:
        return template
    first, _, rest = template.partition(" ")
    if first.lower() in ARTICLES and rest:
        return f"{prefix} {rest}"
    return f"{prefix} {template}"


def encoded_prompt(spec: PipelineSpec, rng: np.random.Generator,
                   prefix: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
    """A random template, prefixed and filled with the placeholder, through encode_prompt."""
    template = spec.templates[rng.integers(len(spec.templates))]
    text = prompt_with_prefix(template, prefix).format(spec.placeholder)
    ids, position = spec.encode_prompt(text)
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1 or not 0 <= int(position) < ids.shape[0]:
        raise ValueError(f"encode_prompt({text!r}) returned ids of shape {ids.shape} and "
                         f"placeholder position {position}: want (L,) and a position in 0..L-1")
    return ids, np.int32(position)


# --- image helpers -------------------------------------------------------------------------

def _resize(image: np.ndarray, size: int, resample=Image.Resampling.BICUBIC) -> np.ndarray:
    """uint8 (H, W, K) -> uint8 (size, size, K) with PIL (bicubic saturates at 0 and 255)."""
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil.resize((size, size), resample))
    return resized.reshape(size, size, channels)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """uint8 or float [0, 255] -> float32 [-1, 1] (the diffusion model's pixels)."""
    return (np.asarray(image, np.float32) / 127.5 - 1.0).astype(np.float32)


def clip_normalize(image: np.ndarray) -> np.ndarray:
    """uint8 or float [0, 255] (H, W, 3) -> CLIP's normalized float32 input."""
    mean = np.asarray(CLIP_MEAN, np.float32)
    std = np.asarray(CLIP_STD, np.float32)
    return ((np.asarray(image, np.float32) / 255.0 - mean) / std).astype(np.float32)


def _warp(image: np.ndarray, out_to_in: np.ndarray, *, order: int, mode: str) -> np.ndarray:
    """Each channel of (H, W, K) resampled at out_to_in (3 x 3, homogeneous (row, col))."""
    return np.stack([
        ndimage.affine_transform(image[..., k], out_to_in[:2, :2], offset=out_to_in[:2, 2],
                                 order=order, mode=mode, cval=0.0, prefilter=False)
        for k in range(image.shape[-1])], axis=-1)


def _rotation_out_to_in(size: int, degrees: float) -> np.ndarray:
    """Output -> input map of a rotation by `degrees` about the image centre."""
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    centre = (size - 1) / 2
    to_origin = np.array([[1, 0, -centre], [0, 1, -centre], [0, 0, 1]], np.float64)
    rotate = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]], np.float64)
    back = np.array([[1, 0, centre], [0, 1, centre], [0, 0, 1]], np.float64)
    return back @ rotate @ to_origin


def _translation_out_to_in(dy: float, dx: float) -> np.ndarray:
    return np.array([[1, 0, -dy], [0, 1, -dx], [0, 0, 1]], np.float64)


def _resized_crop_out_to_in(size: int, resized: int, top: int, left: int) -> np.ndarray:
    """Output -> input map of: resize size -> resized (pixel centres aligned), crop at
    (top, left) back to size."""
    ratio = size / resized
    return np.array([[ratio, 0, (top + 0.5) * ratio - 0.5],
                     [0, ratio, (left + 0.5) * ratio - 0.5],
                     [0, 0, 1]], np.float64)


# --- global stage ----------------------------------------------------------------------------

def augment_for_clip(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Crop uint8 (S, S, 3) -> augmented float32 (size, size, 3) in [0, 255].

    The reference's albumentations chain, in its order: resize to `size` (bicubic); horizontal
    flip p=0.5; rotation by U(-20, 20) degrees p=0.5; Gaussian blur p=0.3 with sigma
    U(0.8, 2.0) * size/224; elastic warp p=0.3 (see ELASTIC_*). Rotation and the elastic warp
    resample bilinearly and mirror at the border (albumentations' reflect-101), so no black
    corners appear that the encoder would learn as part of the object.
    """
    out = _resize(image, size).astype(np.float32)
    if rng.random() < FLIP_P:
        out = out[:, ::-1]
    if rng.random() < ROTATE_P:
        degrees = rng.uniform(-ROTATE_DEGREES, ROTATE_DEGREES)
        out = _warp(out, _rotation_out_to_in(size, degrees), order=1, mode="mirror")
    if rng.random() < BLUR_P:
        sigma = rng.uniform(*BLUR_SIGMA_AT_224) * size / 224
        out = ndimage.gaussian_filter(out, sigma, axes=(0, 1), mode="mirror")
    if rng.random() < ELASTIC_P:
        out = _elastic(out, rng)
    return np.clip(out, 0.0, 255.0).astype(np.float32)


def _elastic(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = image.shape[0]
    displacement = []
    for _ in range(2):
        noise = ndimage.gaussian_filter(rng.uniform(-1, 1, (size, size)),
                                        size * ELASTIC_SMOOTHING, mode="mirror")
        rms = np.sqrt(np.mean(noise ** 2))
        displacement.append(noise * (size * ELASTIC_RMS / max(rms, 1e-12)))
    grid_y, grid_x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    coords = np.stack([grid_y + displacement[0], grid_x + displacement[1]])
    return np.stack([ndimage.map_coordinates(image[..., k], coords, order=1, mode="mirror")
                     for k in range(image.shape[-1])], axis=-1)


def global_example(example: Mapping[str, np.ndarray], rng: np.random.Generator,
                   spec: PipelineSpec) -> Batch:
    """One row of a global-stage batch (see the module docstring)."""
    image = example["image"]
    ids, position = encoded_prompt(spec, rng, None)
    return {
        "pixels": to_unit_range(_resize(image, spec.resolution)),
        "clip_pixels": clip_normalize(augment_for_clip(image, rng, spec.clip_size)),
        "input_ids": ids,
        "placeholder_position": position,
    }


# --- local stage -----------------------------------------------------------------------------

class RescaledTarget(NamedTuple):
    """The local stage's diffusion target: pixels (R, R, 3) [-1, 1], valid_mask (R, R, 1) 0/1,
    the caption prefix (None: the template as written) and the side the crop was resized to."""
    pixels: np.ndarray
    valid_mask: np.ndarray
    prefix: Optional[str]
    scale: int


def rescale_target(image: np.ndarray, rng: np.random.Generator, size: int) -> RescaledTarget:
    """The crop at a random scale, as the reference (Custom Diffusion's augmentation).

    Side s: with p = 2/3 uniform in [size/3, size], else in [1.2 size, 1.4 size), rounded up
    to even. s < 0.6 size: the crop at s x s pasted at a uniform position on black (-1),
    valid_mask = exactly that box, prefix "a far away" or "very small". s > size: the crop at
    s x s, a uniform size x size window of it, prefix "zoomed in" or "close up". Otherwise a
    plain resize to size, no prefix. valid_mask is 1 outside the small case.
    """
    if rng.random() < SMALL_SCALE_PROBABILITY:
        scale = int(rng.integers(size // 3, size + 1))
    else:
        low, high = (int(f * size) for f in LARGE_SCALE_RANGE)
        scale = int(rng.integers(low, max(high, low + 1)))
    scale += scale % 2
    valid = np.ones((size, size, 1), np.float32)
    if scale < PASTE_BELOW * size:
        prefix = SMALL_PREFIXES[rng.integers(len(SMALL_PREFIXES))]
        top, left = (int(v) for v in rng.integers(0, size - scale + 1, 2))
        pixels = np.full((size, size, 3), -1.0, np.float32)
        pixels[top:top + scale, left:left + scale] = to_unit_range(_resize(image, scale))
        valid[:] = 0.0
        valid[top:top + scale, left:left + scale] = 1.0
        return RescaledTarget(pixels, valid, prefix, scale)
    if scale > size:
        prefix = LARGE_PREFIXES[rng.integers(len(LARGE_PREFIXES))]
        top, left = (int(v) for v in rng.integers(0, scale - size + 1, 2))
        window = _resize(image, scale)[top:top + size, left:left + size]
        return RescaledTarget(to_unit_range(window), valid, prefix, scale)
    return RescaledTarget(to_unit_range(_resize(image, size)), valid, None, scale)


def augment_object(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                   size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop (S, S, 3) uint8 and mask (S, S, 1) uint8 0/255 -> (object (size, size, 3) float
    [0, 255], mask (size, size, 1) float 0/1) under one shared random geometry.

    The reference's `aug_cv2`: the masked crop resized to `size` (bicubic; the mask nearest),
    then each with p = 0.5: resize to U{size .. size*256/224} and a uniform size x size crop;
    rotation by U{-30 .. 30} degrees; translation by U{-60 .. 60} * size/224 px on each axis.
    The three steps compose into one affine map, so the image is resampled once (bilinear) and
    the mask with the same map (nearest); both fill with 0 where the map leaves the frame.
    The result is masked again with the final mask: bicubic resizing and bilinear sampling at
    the mask's edge would otherwise leak object colour just outside it.
    """
    binary = (mask[..., :1] >= 128).astype(np.uint8)
    obj = _resize(image * binary, size).astype(np.float32)
    small_mask = _resize(binary, size, Image.Resampling.NEAREST).astype(np.float32)
    out_to_in = np.eye(3)
    if rng.random() < OBJECT_STEP_P:
        resized = int(rng.integers(size, int(size * OBJECT_UPSCALE) + 1))
        top, left = (int(v) for v in rng.integers(0, resized - size + 1, 2))
        out_to_in = out_to_in @ _resized_crop_out_to_in(size, resized, top, left)
    if rng.random() < OBJECT_STEP_P:
        degrees = int(rng.integers(-OBJECT_ROTATE_DEGREES, OBJECT_ROTATE_DEGREES + 1))
        out_to_in = out_to_in @ _rotation_out_to_in(size, degrees)
    if rng.random() < OBJECT_STEP_P:
        reach = int(round(OBJECT_TRANSLATE_AT_224 * size / 224))
        dy, dx = (int(v) for v in rng.integers(-reach, reach + 1, 2))
        out_to_in = out_to_in @ _translation_out_to_in(dy, dx)
    if np.array_equal(out_to_in, np.eye(3)):  # no step drawn: nothing to resample
        warped, warped_mask = obj, small_mask
    else:
        warped_mask = _warp(small_mask, out_to_in, order=0, mode="constant")
        warped = _warp(obj, out_to_in, order=1, mode="constant")
    masked = np.clip(warped, 0.0, 255.0) * warped_mask
    return masked.astype(np.float32), warped_mask.astype(np.float32)


def local_example(example: Mapping[str, np.ndarray], rng: np.random.Generator,
                  spec: PipelineSpec) -> Batch:
    """One row of a local-stage batch (see the module docstring)."""
    image = example["image"]
    target = rescale_target(image, rng, spec.resolution)
    ids, position = encoded_prompt(spec, rng, target.prefix)
    obj, obj_mask = augment_object(image, example["mask"], rng, spec.clip_size)
    return {
        "pixels": target.pixels,
        "valid_mask": target.valid_mask,
        "clip_pixels": clip_normalize(_resize(image, spec.clip_size)),
        "local_pixels": clip_normalize(obj),
        "local_mask": obj_mask,
        "input_ids": ids,
        "placeholder_position": position,
    }


# --- batches -------------------------------------------------------------------------------

def _checked_example(src: Sequence[Mapping[str, np.ndarray]], index: int,
                     stage: str) -> Mapping[str, np.ndarray]:
    example = src[index]
    image = np.asarray(example.get("image"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise UserError(f"ELITE example {index}: image must be (S, S, 3) uint8, got "
                        f"{image.shape} {image.dtype}: rebuild the data set")
    if stage == "local":
        mask = example.get("mask")
        if mask is None:
            raise UserError(f"ELITE example {index} has no mask, which the local stage needs: "
                            "build the data set with segmentation masks")
        mask = np.asarray(mask)
        if mask.dtype != np.uint8 or mask.shape != image.shape[:2] + (1,):
            raise UserError(f"ELITE example {index}: mask must be {image.shape[:2] + (1,)} "
                            f"uint8 like its image, got {mask.shape} {mask.dtype}")
        return {"image": image, "mask": mask}
    return {"image": image}


def batch_row(src: Sequence[Mapping[str, np.ndarray]], spec: PipelineSpec, step: int,
              row: int, index: int) -> Batch:
    """Global row `row` of `step`, holding example `index`."""
    example = _checked_example(src, int(index), spec.stage)
    make = global_example if spec.stage == "global" else local_example
    out = make(example, row_rng(spec.seed, step, row), spec)
    out["example_index"] = np.int32(index)
    return out


def host_batch(src: Sequence[Mapping[str, np.ndarray]], spec: PipelineSpec, step: int,
               process_index: int = 0, process_count: int = 1,
               executor: Optional[concurrent.futures.Executor] = None) -> Batch:
    """This process's slice (G/P rows) of the global batch of `step`, stacked as numpy.

    An executor builds the rows in parallel (same result: every row is a pure function of its
    own numbers)."""
    rows = host_rows(spec.global_batch, process_index, process_count)
    indices = global_batch_rows(step, len(src), spec.global_batch, spec.seed)[rows.start:rows.stop]
    build = functools.partial(batch_row, src, spec, step)
    if executor is None:
        examples = list(map(build, rows, indices))
    else:
        examples = list(executor.map(build, rows, indices))
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


class Prefetcher:
    """Batches of steps start, start+1, ... built ahead on a background thread, in order.

    `depth` batches wait in a queue; `workers` > 1 builds each batch's rows on that many
    threads (PIL and scipy release the GIL for most of the work). Iterate, then close() (or use
    it as a context manager); an error while building is raised by the next `next()`.
    """

    _POLL_S = 0.1

    def __init__(self, src: Sequence[Mapping[str, np.ndarray]], spec: PipelineSpec,
                 start_step: int, process_index: int = 0, process_count: int = 1,
                 depth: int = 2, workers: int = 1, stop_step: Optional[int] = None):
        host_rows(spec.global_batch, process_index, process_count)  # bad args fail here, now
        if depth < 1 or workers < 1:
            raise UserError(f"prefetch depth ({depth}) and workers ({workers}) must be >= 1")
        self._src, self._spec = src, spec
        self._process = (process_index, process_count)
        self._step, self._stop_step = start_step, stop_step
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stopping = threading.Event()
        self._executor = (concurrent.futures.ThreadPoolExecutor(workers, "elite-rows")
                          if workers > 1 else None)
        self._thread = threading.Thread(target=self._produce, name="elite-prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=self._POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        step = self._step
        try:
            while not self._stopping.is_set():
                if self._stop_step is not None and step >= self._stop_step:
                    self._put(StopIteration())
                    return
                batch = host_batch(self._src, self._spec, step, *self._process,
                                   executor=self._executor)
                if not self._put(batch):
                    return
                step += 1
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        while True:
            if self._stopping.is_set():
                raise StopIteration
            try:
                item = self._queue.get(timeout=self._POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the ELITE prefetch thread ended without a batch")
        if isinstance(item, StopIteration):
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        self._step += 1
        return item

    @property
    def next_step(self) -> int:
        """The step whose batch `next()` returns."""
        return self._step

    def close(self):
        """Stops the thread (it finishes the batch it is building) and drops queued batches."""
        self._stopping.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if threading.current_thread() is not self._thread:
            self._thread.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc):
        self.close()
