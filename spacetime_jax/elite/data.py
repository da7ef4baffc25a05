"""ELITE's object-crop data set: a tensorflow-datasets builder over an OpenImages-style folder.

The source folder (tfds' manual dir, local or gs://; nothing is downloaded) holds one folder per
split, and every such folder becomes a tfds split under its own name (train, validation, test,
any name):

  ROOT/<split>/images/<ImageID>.jpg|.jpeg|.png
  ROOT/<split>/masks/<ImageID>_<LabelName>_<BoxID>.png    one file per object
  ROOT/<split>/boxes.csv                                   optional

Mask names follow OpenImages' segmentation masks: the ImageID has no underscore, the BoxID is
after the last underscore, and the LabelName (slashes dropped, e.g. m01g317) is in between. A
mask pixel is the object where it is nonzero. boxes.csv has OpenImages' segmentation columns
MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax (coordinates as fractions of
the image side); an object listed there takes its box from it, any other from its mask's
nonzero pixels.

Per object, as in the ELITE reference: the mask is resized to its image (nearest) when it has
the image's aspect ratio but another size; the box must cover `min_area`..`max_area` of the
image, have both sides >= `min_side` pixels and an aspect ratio (w / h) in
`min_aspect`..`max_aspect`; the crop is the box padded by `pad_min`..`pad_max` pixels (drawn
from a hash of the mask's name, so a rebuild is identical), clipped to the image, and resized to
`crop_size` x `crop_size` without keeping its aspect ratio.

The two ELITE stages filter differently, as the reference's two data sets do (its
OpenImagesDataset and OpenImagesDatasetWithMask; METHODS.md): stage 1 (global) keeps boxes
covering 0.02..0.8 of the image whatever their side or aspect, padded by 10 px; stage 2 (local)
keeps boxes with both sides >= 100 px and an aspect ratio in 0.5..2 whatever their area, padded
by 10..19 px. configs/elite_global.py and configs/elite_local.py set these as data.* keys
(min_side 0, min_aspect 0, max_aspect inf, min_area 0, max_area 1: that filter is off), and
crops_config turns a config's data section into the builder config. Each setting is its own
tfds config (its name holds every value), so the two stages' builds never share a folder.

Example schema:
  image      (crop_size, crop_size, 3) uint8, the crop
  mask       (crop_size, crop_size, 1) uint8, 255 on the object, 0 elsewhere
  image_id   text, the source image's ImageID
  label      text, the LabelName as written in the mask's file name
  object_id  text, the mask's file name without .png (also the example's key)
The image is resized bicubic, the mask nearest; a data source returns text as bytes.

An unreadable image or mask is logged by name and counted; a split whose unreadable share
exceeds `max_bad_fraction` stops the build (nothing is ever replaced by a blank). The builder's
`info.metadata` keeps, per split, the objects each filter dropped ("dropped": {split: {reason:
count}}) and the unreadable count ("unreadable"), and the source folder ("source").

Configs are runtime objects (`ObjectCropsConfig(...)`, or `toyworld_config` for the toy world);
a data_dir holds one build per config name, so use one data_dir per source folder. A gs://
data_dir is read through a local copy (array_record opens local files only).
"""
from __future__ import annotations

import atexit
import csv
import dataclasses
import hashlib
import io
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Iterator, NamedTuple, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from spacetime_jax.data.images import ImageError, read_upright, to_rgb
from spacetime_jax.errors import UserError
from spacetime_jax.paths import as_path, copy_tree, is_remote, resolve

DATASET_NAME = "elite_object_crops"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
BOXES_CSV = "boxes.csv"
BOX_COLUMNS = ("MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin",
               "BoxYMax")
LAYOUT = ("ROOT/<split>/images/<ImageID>.jpg|.png, "
          "ROOT/<split>/masks/<ImageID>_<LabelName>_<BoxID>.png, optional ROOT/<split>/boxes.csv")
# A mask with its image's aspect ratio up to this relative difference is the image's mask at
# another resolution (OpenImages ships masks at their own size).
ASPECT_TOLERANCE = 0.01
# Why an object is left out, in the order the filters are tried ("empty": an empty mask, or a
# CSV box without area).
DROP_REASONS = ("empty", "area", "side", "aspect")
_SPLIT_NAME = re.compile(r"^[\w-]+$")  # what tfds accepts as a split name (it names files)
_BAD_NAMES_SHOWN = 5

_log = logging.getLogger(__name__)


class _TfdsNoise(logging.Filter):
    """Drops two tfds lines that every open of a runtime config prints and that no user can
    act on: the config is ours by design, and PIL decodes the PNGs."""
    _NOISE = ("Using custom data configuration", "OpenCV is not installed")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self._NOISE)


logging.getLogger("absl").addFilter(_TfdsNoise())


@dataclasses.dataclass(eq=False)
class ObjectCropsConfig(tfds.core.BuilderConfig):
    """The crop size, object filters and padding. The defaults apply both stages' filters at
    once (the stages' own settings: crops_config of configs/elite_global.py / elite_local.py).
    The name is derived from the values, so builds with different settings never share a
    folder."""
    name: str = dataclasses.field(init=False, default="")
    crop_size: int = 512
    min_side: float = 100.0  # pixels of the original image, both box sides
    min_aspect: float = 0.5  # box width / height; 0 and inf: no limit
    max_aspect: float = 2.0
    min_area: float = 0.02  # box area / image area
    max_area: float = 0.8
    pad_min: int = 10  # crop padding in pixels, drawn per object in [pad_min, pad_max]
    pad_max: int = 19
    max_bad_fraction: float = 0.01  # unreadable objects a split may have, as a share

    def __post_init__(self):
        _check_settings(self)
        self.name = (f"crop{self.crop_size}_side{self.min_side:g}"
                     f"_aspect{self.min_aspect:g}-{self.max_aspect:g}"
                     f"_area{self.min_area:g}-{self.max_area:g}_pad{self.pad_min}-{self.pad_max}"
                     f"_bad{self.max_bad_fraction:g}")
        self.description = f"object crops, {self.name}"


def _check_settings(config: ObjectCropsConfig) -> None:
    problems = []
    if config.crop_size < 1:
        problems.append(f"crop_size must be >= 1, got {config.crop_size}")
    if config.min_side < 0:
        problems.append(f"min_side must be >= 0, got {config.min_side}")
    if not 0 <= config.min_aspect <= config.max_aspect:
        problems.append(f"need 0 <= min_aspect <= max_aspect, got {config.min_aspect}, "
                        f"{config.max_aspect}")
    if not 0 <= config.min_area <= config.max_area <= 1:
        problems.append(f"need 0 <= min_area <= max_area <= 1, got {config.min_area}, "
                        f"{config.max_area}")
    if not 0 <= config.pad_min <= config.pad_max:
        problems.append(f"need 0 <= pad_min <= pad_max, got {config.pad_min}, {config.pad_max}")
    if not 0 <= config.max_bad_fraction < 1:
        problems.append(f"max_bad_fraction must lie in [0, 1), got {config.max_bad_fraction}")
    if problems:
        raise UserError("bad object-crop settings: " + "; ".join(problems))


def crops_config(data) -> ObjectCropsConfig:
    """The builder config of a run config's `data` section (configs/elite_global.py,
    configs/elite_local.py): its crop size (`resolution`), filters and padding."""
    return ObjectCropsConfig(crop_size=data.resolution, min_side=data.min_side,
                             min_aspect=data.min_aspect, max_aspect=data.max_aspect,
                             min_area=data.min_area, max_area=data.max_area,
                             pad_min=data.pad_min, pad_max=data.pad_max,
                             max_bad_fraction=data.max_bad_fraction)


# ---------------------------------------------------------------- the source folder's listing


class MaskName(NamedTuple):
    image_id: str
    label: str
    box_id: str


class Box(NamedTuple):
    """A box in pixels of the original image; x1 and y1 are exclusive."""
    x0: float
    y0: float
    x1: float
    y1: float


class SplitSource(NamedTuple):
    """What a split folder holds: image paths by ImageID, sorted mask paths, CSV boxes."""
    name: str
    images: dict[str, epath.Path]
    masks: list[epath.Path]
    csv_boxes: dict[str, Box]  # by mask file name; fractions of the image side


def parse_mask_name(path: epath.Path) -> MaskName:
    """<ImageID>_<LabelName>_<BoxID>.png -> its parts (the label may hold underscores)."""
    image_id, _, rest = path.stem.partition("_")
    label, _, box_id = rest.rpartition("_")
    if not (image_id and label and box_id):
        raise UserError(f"mask {path} is not named <ImageID>_<LabelName>_<BoxID>.png; "
                        f"expected layout: {LAYOUT}")
    return MaskName(image_id, label, box_id)


def find_split_dirs(root: str | os.PathLike) -> list[epath.Path]:
    """The split folders of ROOT in name order; a UserError when there are none."""
    root = as_path(root)
    if not root.is_dir():
        raise UserError(f"object data folder {root} does not exist; expected layout: {LAYOUT}")
    splits = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not splits:
        raise UserError(f"no split folders (train/, test/, ...) in {root}; "
                        f"expected layout: {LAYOUT}")
    for split in splits:
        if not _SPLIT_NAME.match(split.name):
            raise UserError(f"split folder {split} must be named with letters, digits, _ or - "
                            "only; rename it")
    return splits


def _files_with_suffix(folder: epath.Path, suffixes: tuple[str, ...]) -> list[epath.Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in suffixes and p.is_file() and not p.name.startswith("."))


def read_csv_boxes(path: str | os.PathLike) -> dict[str, Box]:
    """boxes.csv -> {mask file name: Box in fractions of the image side}."""
    path = as_path(path)
    reader = csv.DictReader(io.StringIO(path.read_text(), newline=""))
    missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise UserError(f"{path} lacks the columns {', '.join(missing)}; expected "
                        f"OpenImages' segmentation columns {','.join(BOX_COLUMNS)}")
    boxes = {}
    for line, row in enumerate(reader, start=2):
        try:
            box = Box(float(row["BoxXMin"]), float(row["BoxYMin"]), float(row["BoxXMax"]),
                      float(row["BoxYMax"]))
        except (TypeError, ValueError) as err:
            raise UserError(f"{path} line {line}: box coordinates must be numbers "
                            f"({err})") from err
        boxes[row["MaskPath"].rsplit("/", 1)[-1]] = box
    return boxes


def list_split(split_dir: str | os.PathLike) -> SplitSource:
    """A split folder's images, masks and CSV boxes; a UserError naming what is missing."""
    split_dir = as_path(split_dir)
    for sub, files in (("images", "<ImageID>.jpg|.png"),
                       ("masks", "<ImageID>_<LabelName>_<BoxID>.png")):
        if not (split_dir / sub).is_dir():
            raise UserError(f"split {split_dir} has no {sub}/ folder (of {files}); "
                            f"expected layout: {LAYOUT}")
    image_paths = _files_with_suffix(split_dir / "images", IMAGE_SUFFIXES)
    masks = _files_with_suffix(split_dir / "masks", (".png",))
    for sub, found in (("images", image_paths), ("masks", masks)):
        if not found:
            raise UserError(f"no files in {split_dir / sub}; expected layout: {LAYOUT}")
    images = {}
    for path in image_paths:
        images.setdefault(path.stem, path)
    missing = [m.name for m in masks if parse_mask_name(m).image_id not in images]
    if missing:
        raise UserError(f"{len(missing)} masks in {split_dir / 'masks'} have no image in "
                        f"{split_dir / 'images'} (first: {', '.join(missing[:_BAD_NAMES_SHOWN])}); "
                        f"expected layout: {LAYOUT}")
    csv_path = split_dir / BOXES_CSV
    csv_boxes = read_csv_boxes(csv_path) if csv_path.is_file() else {}
    return SplitSource(split_dir.name, images, masks, csv_boxes)


# ------------------------------------------------------------------------- one object's crop


def read_image(path: epath.Path) -> np.ndarray:
    """uint8 (H, W, 3) RGB as displayed (data/images.py's opener: upright, every byte decoded
    here). Raises ImageError naming the file."""
    return np.asarray(to_rgb(read_upright(path)), np.uint8)


def read_mask(path: epath.Path) -> np.ndarray:
    """bool (H, W), upright: the object where the mask is nonzero (in any channel). Raises
    ImageError naming the file."""
    pixels = np.asarray(read_upright(path, "mask"))
    return pixels.any(axis=-1) if pixels.ndim == 3 else pixels != 0


def fit_mask_to_image(mask: np.ndarray, mask_path: epath.Path, image_shape: tuple[int, int],
                      image_path: epath.Path) -> np.ndarray:
    """The mask at the image's size: resized (nearest) when only the resolution differs."""
    if mask.shape == image_shape:
        return mask
    (mh, mw), (ih, iw) = mask.shape, image_shape
    if abs((mw / mh) / (iw / ih) - 1.0) > ASPECT_TOLERANCE:
        raise UserError(f"mask {mask_path} ({mw}x{mh}) and image {image_path} ({iw}x{ih}) "
                        "have different aspect ratios: the mask does not belong to the image")
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((iw, ih), Image.NEAREST)
    return np.asarray(resized) != 0


def mask_box(mask: np.ndarray) -> Optional[Box]:
    """The tight box of the mask's pixels; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return Box(float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def scale_box(box: Box, width: int, height: int) -> Box:
    """A box in fractions of the image side -> pixels."""
    return Box(box.x0 * width, box.y0 * height, box.x1 * width, box.y1 * height)


def drop_reason(box: Optional[Box], width: int, height: int,
                config: ObjectCropsConfig) -> Optional[str]:
    """Which of DROP_REASONS leaves the object out, or None when it is kept."""
    box_w, box_h = (0.0, 0.0) if box is None else (box.x1 - box.x0, box.y1 - box.y0)
    if box_w <= 0 or box_h <= 0:
        return "empty"
    if not config.min_area <= box_w * box_h / (width * height) <= config.max_area:
        return "area"
    if min(box_w, box_h) < config.min_side:
        return "side"
    if not config.min_aspect <= box_w / box_h <= config.max_aspect:
        return "aspect"
    return None


def object_padding(mask_name: str, pad_min: int, pad_max: int) -> int:
    """The crop padding of one object: uniform in [pad_min, pad_max], fixed by its name."""
    digest = int.from_bytes(hashlib.sha256(mask_name.encode()).digest()[:8], "big")
    return pad_min + digest % (pad_max - pad_min + 1)


def crop_window(box: Box, pad: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in whole pixels: the padded box clipped to the image."""
    return (max(0, math.floor(box.x0) - pad), max(0, math.floor(box.y0) - pad),
            min(width, math.ceil(box.x1) + pad), min(height, math.ceil(box.y1) + pad))


def crop_object(image: np.ndarray, mask: np.ndarray, window: tuple[int, int, int, int],
                crop_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The window of image and mask, each resized to crop_size x crop_size (aspect not kept):
    uint8 (S, S, 3) bicubic, and uint8 (S, S, 1) nearest with values 0/255."""
    left, top, right, bottom = window
    size = (crop_size, crop_size)
    image_crop = Image.fromarray(image[top:bottom, left:right]).resize(size, Image.BICUBIC)
    mask_crop = Image.fromarray(mask[top:bottom, left:right].astype(np.uint8) * 255)
    mask_crop = mask_crop.resize(size, Image.NEAREST)
    return np.asarray(image_crop), np.asarray(mask_crop)[..., None]


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG-encoded uint8 (H, W, 1|3) pixels (PIL's encoder: no TensorFlow needed)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------- the builder


class _ImageCache:
    """The last image read: a split's masks are sorted, so an image's objects come together."""

    def __init__(self):
        self._path, self._pixels, self._error = None, None, None

    def get(self, path: epath.Path) -> np.ndarray:
        if path != self._path:
            self._path, self._pixels, self._error = path, None, None
            try:
                self._pixels = read_image(path)
            except ImageError as err:
                self._error = err
        if self._error is not None:
            raise self._error
        return self._pixels


class ObjectCrops(tfds.core.GeneratorBasedBuilder):
    """Object crops and masks from an OpenImages-style folder (see the module docstring)."""

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIG_CLASS = ObjectCropsConfig
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Pass a folder laid out as {LAYOUT} as the manual dir."

    def __init__(self, *, config: Optional[ObjectCropsConfig] = None, **kwargs):
        # No pre-registered configs: tfds refuses a config object that is not the registered
        # one of the same name, and every setting is a runtime choice here.
        super().__init__(config=config or ObjectCropsConfig(), **kwargs)

    def is_prepared(self) -> bool:
        # tfds warns "Variant folder ... has no dataset_info.json" when asked about a build
        # that does not exist yet, i.e. on every first run: no such file, nothing is built.
        return (self.data_path / "dataset_info.json").exists() and super().is_prepared()

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.crop_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.splitlines()[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "mask": tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
                "image_id": tfds.features.Text(),
                "label": tfds.features.Text(),
                "object_id": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = as_path(dl_manager.manual_dir)
        sources = [list_split(d) for d in find_split_dirs(root)]
        self.info.metadata["source"] = str(root)
        self.info.metadata["dropped"] = {}
        self.info.metadata["unreadable"] = {}
        return {source.name: self._generate_examples(source) for source in sources}

    def _generate_examples(self, source: SplitSource) -> Iterator[tuple[str, dict]]:
        config = self.builder_config
        dropped = dict.fromkeys(DROP_REASONS, 0)
        unreadable, kept = [], 0
        images = _ImageCache()
        for mask_path in source.masks:
            name = parse_mask_name(mask_path)
            image_path = source.images[name.image_id]
            try:
                image = images.get(image_path)
            except ImageError as err:
                _log.error("object %s: %s", mask_path.name, err)  # err names the file
                unreadable.append(f"images/{image_path.name}")
                continue
            try:
                mask = read_mask(mask_path)
            except ImageError as err:
                _log.error("object %s: %s", mask_path.name, err)
                unreadable.append(f"masks/{mask_path.name}")
                continue
            height, width = image.shape[:2]
            mask = fit_mask_to_image(mask, mask_path, (height, width), image_path)
            csv_box = source.csv_boxes.get(mask_path.name)
            box = scale_box(csv_box, width, height) if csv_box else mask_box(mask)
            reason = drop_reason(box, width, height, config)
            if reason is not None:
                dropped[reason] += 1
                continue
            pad = object_padding(mask_path.name, config.pad_min, config.pad_max)
            image_crop, mask_crop = crop_object(image, mask, crop_window(box, pad, width, height),
                                                config.crop_size)
            kept += 1
            yield mask_path.stem, {"image": png_bytes(image_crop), "mask": png_bytes(mask_crop),
                                   "image_id": name.image_id, "label": name.label,
                                   "object_id": mask_path.stem}
        _check_split_outcome(source, config, kept, dropped, unreadable)
        _log.info("split %s: %d objects kept, dropped %s, %d unreadable", source.name, kept,
                  dropped, len(unreadable))
        self.info.metadata["dropped"][source.name] = dropped
        self.info.metadata["unreadable"][source.name] = len(unreadable)


def _check_split_outcome(source: SplitSource, config: ObjectCropsConfig, kept: int,
                         dropped: dict[str, int], unreadable: list[str]) -> None:
    total = len(source.masks)
    if len(unreadable) > config.max_bad_fraction * total:
        raise UserError(
            f"split {source.name}: {len(unreadable)} of {total} objects have an unreadable image "
            f"or mask (more than max_bad_fraction={config.max_bad_fraction:g}); first: "
            f"{', '.join(unreadable[:_BAD_NAMES_SHOWN])}. Fix or remove those files")
    if kept == 0:
        raise UserError(
            f"split {source.name}: no object of {total} passes the filters (dropped: "
            f"{', '.join(f'{k} {v}' for k, v in dropped.items())}; settings: area "
            f"{config.min_area:g}..{config.max_area:g}, min_side {config.min_side:g} px, aspect "
            f"{config.min_aspect:g}..{config.max_aspect:g}); loosen the filters or add objects")


# ------------------------------------------------------------------------------ entry points


def _prepared_builder(root: str | os.PathLike, config: ObjectCropsConfig,
                      data_dir: str | os.PathLike) -> ObjectCrops:
    root = as_path(resolve(root))
    local_dir = (_local_copy(root, config, as_path(data_dir)) if is_remote(data_dir)
                 else os.fspath(data_dir))
    builder = ObjectCrops(config=config, data_dir=local_dir, file_format="array_record")
    if builder.is_prepared():
        return _warn_if_built_elsewhere(builder, root, data_dir)
    _build(builder, root)
    return builder


def _build(builder: ObjectCrops, root: epath.Path) -> None:
    find_split_dirs(root)  # a clear error before tfds' own about a missing manual dir
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(root),
                                                     try_download_gcs=False))


# array_record files are written and read through local file descriptors only, so a gs://
# data_dir is used through a local copy: built here and uploaded when the bucket lacks it, else
# downloaded; once per process and build, removed at exit.
_LOCAL_COPIES: dict[str, str] = {}


def _local_copy(root: epath.Path, config: ObjectCropsConfig, data_dir: epath.Path) -> str:
    """A local data_dir holding the build of `config` that `data_dir` (gs://) holds."""
    variant = f"{DATASET_NAME}/{config.name}/{ObjectCrops.VERSION}"
    remote = data_dir / variant
    if str(remote) not in _LOCAL_COPIES:
        local_dir = tempfile.mkdtemp(prefix="spacetime-jax-tfds-")
        atexit.register(shutil.rmtree, local_dir, ignore_errors=True)
        if ObjectCrops(config=config, data_dir=str(data_dir)).is_prepared():
            copy_tree(remote, as_path(local_dir) / variant)
        else:
            _build(ObjectCrops(config=config, data_dir=local_dir, file_format="array_record"),
                   root)
            _upload(as_path(local_dir) / variant, remote)
        _LOCAL_COPIES[str(remote)] = local_dir
    return _LOCAL_COPIES[str(remote)]


def _upload(local_variant: epath.Path, remote: epath.Path) -> None:
    """Copies a built variant folder; tfds sees a variant as built once it has both of these
    files, so they go last (a killed upload leaves a folder that is rebuilt, not trusted)."""
    last = ("features.json", "dataset_info.json")
    entries = sorted(local_variant.iterdir(),
                     key=lambda e: last.index(e.name) if e.name in last else -1)
    remote.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        if entry.is_dir():
            copy_tree(entry, remote / entry.name)
        else:
            (remote / entry.name).write_bytes(entry.read_bytes())


def _warn_if_built_elsewhere(builder: ObjectCrops, root: epath.Path,
                             data_dir: str | os.PathLike) -> ObjectCrops:
    built_from = builder.info.metadata.get("source")
    if built_from != str(root):
        shown = as_path(data_dir) if is_remote(data_dir) else builder.data_dir
        _log.warning("%s was built from %s, not %s: delete it or use another data_dir to "
                     "rebuild", shown, built_from, root)
    return builder


def build_object_crops(root: str | os.PathLike, config: ObjectCropsConfig,
                       data_dir: str | os.PathLike) -> dict[str, int]:
    """Builds the crops of ROOT into data_dir (once: a built dataset is reused) and returns
    {split: number of examples}."""
    builder = _prepared_builder(root, config, data_dir)
    return {name: split.num_examples for name, split in builder.info.splits.items()}


def open_object_crops(root: str | os.PathLike, config: ObjectCropsConfig,
                      data_dir: str | os.PathLike, split: str):
    """A random-access source of one split (len(), [i] -> dict of numpy arrays and bytes),
    building it first if needed."""
    builder = _prepared_builder(root, config, data_dir)
    if split not in builder.info.splits:
        raise UserError(f"no split {split!r} in {root}; it has: "
                        f"{', '.join(builder.info.splits.keys())}")
    return builder.as_data_source(split)
