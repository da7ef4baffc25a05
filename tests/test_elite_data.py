"""ELITE's object-crop data set: the tfds builder over an OpenImages-style folder, and the toy-world
writer that makes such a folder."""
import csv
import dataclasses
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spacetime_jax.elite import data
from spacetime_jax.elite import toyworld_data as td
from spacetime_jax.errors import UserError
from spacetime_jax.toyworld.world import is_held_out

N_TRAIN, N_TEST, SEED, SIZE = 12, 6, 3, 64
CONFIG = td.toyworld_config(SIZE, crop_size=32)  # min_side 6 px, padding 1 px


def _write_object(split_dir: Path, image_id: str, image: np.ndarray, mask: np.ndarray,
                  label: str = "thing") -> str:
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(split_dir / "images" / f"{image_id}.png")
    mask_name = f"{image_id}_{label}_0.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(split_dir / "masks" / mask_name)
    return mask_name


def _rectangle_object(width: int, height: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A gray image with a white width x height rectangle at (8, 8), and its mask."""
    mask = np.zeros((size, size), bool)
    mask[8:8 + height, 8:8 + width] = True
    image = np.where(mask[..., None], 255, 90).astype(np.uint8).repeat(3, axis=-1)
    return image, mask


def _shrink_csv_box(csv_path: Path, mask_name: str) -> None:
    """Gives one object a CSV box far below min_area, whatever its mask says."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["MaskPath"] == mask_name:
            row.update(BoxXMin="0.1", BoxXMax="0.12", BoxYMin="0.1", BoxYMax="0.12")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=data.BOX_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Toy objects plus three that the filters must drop: one too thin (side), one too
    elongated (aspect), one whose CSV box is too small although its mask is not (area)."""
    root = tmp_path_factory.mktemp("objects") / "src"
    td.write_toyworld_objects(root, N_TRAIN, N_TEST, SEED, SIZE)
    _write_object(root / "train", "thinrect", *_rectangle_object(5, 20))  # area 0.024, side 5
    _write_object(root / "train", "longrect", *_rectangle_object(40, 10))  # aspect 4
    first_test_mask = sorted((root / "test" / "masks").iterdir())[0].name
    _shrink_csv_box(root / "test" / data.BOXES_CSV, first_test_mask)
    return root


@pytest.fixture(scope="module")
def built(source, tmp_path_factory) -> tuple[Path, dict[str, int]]:
    data_dir = tmp_path_factory.mktemp("tfds")
    return data_dir, data.build_object_crops(source, CONFIG, data_dir)


def _examples(source: Path, data_dir: Path, split: str) -> list[dict]:
    examples = data.open_object_crops(source, CONFIG, data_dir, split)
    return [examples[i] for i in range(len(examples))]


def test_split_sizes_are_the_written_objects_minus_the_filtered(built):
    data_dir, sizes = built
    assert sizes == {"train": N_TRAIN, "test": N_TEST - 1}
    metadata = data.ObjectCrops(config=CONFIG, data_dir=data_dir).info.metadata
    assert metadata["dropped"] == {
        "train": {"empty": 0, "area": 0, "side": 1, "aspect": 1},
        "test": {"empty": 0, "area": 1, "side": 0, "aspect": 0}}
    assert metadata["unreadable"] == {"train": 0, "test": 0}


def test_examples_have_the_schema(source, built):
    examples = _examples(source, built[0], "train")
    assert len(examples) == N_TRAIN
    for example in examples:
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
        assert example["mask"].shape == (32, 32, 1) and example["mask"].dtype == np.uint8
        assert set(np.unique(example["mask"])) == {0, 255}
        image_id, label, box_id = example["object_id"].decode().split("_")
        assert (example["image_id"].decode(), example["label"].decode()) == (image_id, label)
    assert {e["object_id"] for e in examples}.isdisjoint({b"thinrect_thing_0",
                                                         b"longrect_thing_0"})


def test_example_is_the_padded_box_of_its_mask(source, built):
    example = _examples(source, built[0], "train")[0]
    object_id = example["object_id"].decode()
    mask = np.asarray(Image.open(source / "train" / "masks" / f"{object_id}.png")) > 0
    image = np.asarray(Image.open(source / "train" / "images" / f"{object_id.split('_')[0]}.png"))
    rows, cols = np.nonzero(mask)
    pad = data.object_padding(f"{object_id}.png", CONFIG.pad_min, CONFIG.pad_max)
    top, left = max(rows.min() - pad, 0), max(cols.min() - pad, 0)
    bottom, right = min(rows.max() + 1 + pad, SIZE), min(cols.max() + 1 + pad, SIZE)
    expected_mask = Image.fromarray(mask[top:bottom, left:right].astype(np.uint8) * 255)
    expected_mask = np.asarray(expected_mask.resize((32, 32), Image.NEAREST))
    np.testing.assert_array_equal(example["mask"][..., 0], expected_mask)
    expected_image = Image.fromarray(image[top:bottom, left:right]).resize((32, 32),
                                                                          Image.BICUBIC)
    diff = np.abs(example["image"].astype(int) - np.asarray(expected_image, int))
    assert diff.max() <= 1


def test_two_builds_give_byte_identical_examples(source, built, tmp_path):
    for split in ("train", "test"):
        first = _examples(source, built[0], split)
        again = _examples(source, tmp_path, split)
        assert [e["object_id"] for e in first] == [e["object_id"] for e in again]
        for a, b in zip(first, again):
            assert a["image"].tobytes() == b["image"].tobytes()
            assert a["mask"].tobytes() == b["mask"].tobytes()


def test_drop_reason_applies_the_filters_in_order():
    config = data.ObjectCropsConfig(min_side=10)
    assert data.drop_reason(None, 100, 100, config) == "empty"
    assert data.drop_reason(data.Box(5, 5, 5, 40), 100, 100, config) == "empty"
    assert data.drop_reason(data.Box(0, 0, 12, 12), 100, 100, config) == "area"  # 0.0144
    assert data.drop_reason(data.Box(0, 0, 95, 95), 100, 100, config) == "area"  # 0.9025
    assert data.drop_reason(data.Box(0, 0, 9, 80), 100, 100, config) == "side"
    assert data.drop_reason(data.Box(0, 0, 15, 40), 100, 100, config) == "aspect"  # 0.375
    assert data.drop_reason(data.Box(0, 0, 20, 40), 100, 100, config) is None  # 0.5: kept


def test_padding_is_fixed_by_the_mask_name_and_within_range():
    pads = [data.object_padding(f"img{i}_m01_0.png", 10, 19) for i in range(200)]
    assert pads == [data.object_padding(f"img{i}_m01_0.png", 10, 19) for i in range(200)]
    assert set(pads) == set(range(10, 20))


def test_mask_name_label_may_hold_underscores():
    assert data.parse_mask_name(Path("0a1b_m04_sv_9f3c.png")) == ("0a1b", "m04_sv", "9f3c")
    with pytest.raises(UserError, match="not named <ImageID>_<LabelName>_<BoxID>"):
        data.parse_mask_name(Path("nolabel.png"))


def test_config_name_holds_every_setting():
    config = data.ObjectCropsConfig(crop_size=64, min_side=16, pad_min=1, pad_max=2)
    assert config.name == "crop64_side16_aspect0.5-2_area0.02-0.8_pad1-2_bad0.01"
    assert (data.ObjectCropsConfig().name
            == "crop512_side100_aspect0.5-2_area0.02-0.8_pad10-19_bad0.01")
    with pytest.raises(UserError, match="min_aspect <= max_aspect"):
        data.ObjectCropsConfig(min_aspect=3.0)


# ------------------------------------------------------------------- each stage's filters

STAGE_SIZE = 400  # px of the source images
# Boxes (width, height) in 400 x 400 images, and the stages that keep them (METHODS.md): stage 1
# (global) keeps area 0.02..0.8 of the image, any side or aspect; stage 2 (local) keeps both
# sides >= 100 px and aspect 0.5..2, any area.
STAGE_OBJECTS = {
    "both": ((150, 150), {"global", "local"}),     # area 0.14, sides 150, aspect 1
    "small": ((60, 60), {"global"}),               # area 0.0225; sides 60 < 100
    "long": ((300, 120), {"global"}),              # area 0.225; aspect 2.5 > 2
    "large": ((380, 380), {"local"}),              # area 0.9025 > 0.8; sides 380, aspect 1
    "tiny": ((40, 40), set()),                     # area 0.01 < 0.02; sides 40 < 100
}


def _stage_config(stage: str) -> data.ObjectCropsConfig:
    from spacetime_jax.cli import builtin_configs, load_config_module
    config = load_config_module(builtin_configs()[f"elite_{stage}"]).get_config("sd15")
    config.data.resolution = 32  # small crops: the filters and padding are the stage's own
    return data.crops_config(config.data)


@pytest.fixture(scope="module")
def stage_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stages") / "src"
    for name, ((width, height), _) in STAGE_OBJECTS.items():
        image, mask = _rectangle_object(width, height, size=STAGE_SIZE)
        _write_object(root / "train", name, image, mask)
    return root


def test_each_stage_keeps_the_objects_of_its_own_filters(stage_source, tmp_path):
    data_dir = tmp_path / "tfds"  # one data_dir for both stages: a build per setting
    for stage in ("global", "local"):
        config = _stage_config(stage)
        examples = data.open_object_crops(stage_source, config, data_dir, "train")
        kept = {examples[i]["image_id"].decode() for i in range(len(examples))}
        assert kept == {name for name, (_, stages) in STAGE_OBJECTS.items() if stage in stages}
    builds = sorted(p.name for p in (data_dir / data.DATASET_NAME).iterdir())
    assert builds == sorted([_stage_config("global").name, _stage_config("local").name])
    dropped = {stage: data.ObjectCrops(config=_stage_config(stage), data_dir=data_dir)
               .info.metadata["dropped"]["train"] for stage in ("global", "local")}
    assert dropped == {"global": {"empty": 0, "area": 2, "side": 0, "aspect": 0},
                       "local": {"empty": 0, "area": 0, "side": 2, "aspect": 1}}


def test_stage_settings_are_the_references():
    stage1, stage2 = _stage_config("global"), _stage_config("local")
    assert (stage1.min_area, stage1.max_area, stage1.min_side) == (0.02, 0.8, 0)
    assert (stage1.min_aspect, stage1.max_aspect) == (0, float("inf"))
    assert (stage1.pad_min, stage1.pad_max) == (10, 10)  # the reference: min(10, to the edge)
    assert (stage2.min_side, stage2.min_aspect, stage2.max_aspect) == (100, 0.5, 2.0)
    assert (stage2.min_area, stage2.max_area) == (0, 1)
    assert (stage2.pad_min, stage2.pad_max) == (10, 19)  # random.choice(range(10, 20))
    assert stage1.name == "crop32_side0_aspect0-inf_area0.02-0.8_pad10-10_bad0.01"
    assert stage2.name == "crop32_side100_aspect0.5-2_area0-1_pad10-19_bad0.01"


def test_toy_variants_scale_only_the_pixel_settings():
    from spacetime_jax.cli import builtin_configs, load_config_module
    toy = {stage: data.crops_config(load_config_module(
        builtin_configs()[f"elite_{stage}"]).get_config("tiny").data)
        for stage in ("global", "local")}
    assert toy["global"].name == "crop64_side0_aspect0-inf_area0.02-0.8_pad32-48_bad0.01"
    assert toy["local"].name == "crop64_side12_aspect0.5-2_area0-1_pad32-48_bad0.01"


def test_stage_one_crop_is_the_box_padded_by_ten_pixels(stage_source, tmp_path):
    example = data.open_object_crops(stage_source, _stage_config("global"), tmp_path, "train")
    by_id = {example[i]["image_id"].decode(): example[i] for i in range(len(example))}
    image, mask = _rectangle_object(150, 150, size=STAGE_SIZE)
    # The box is rows and columns 8..157; padded by 10 and clipped to the image: 0..167.
    window = (0, 0, 168, 168)
    expected_image, expected_mask = data.crop_object(image, mask, window, 32)
    np.testing.assert_array_equal(by_id["both"]["image"], expected_image)
    np.testing.assert_array_equal(by_id["both"]["mask"], expected_mask)


# ----------------------------------------------------------------------------- bad input


def _build(root: Path, tmp_path: Path, config: data.ObjectCropsConfig = CONFIG) -> dict:
    return data.build_object_crops(root, config, tmp_path / "tfds")


def test_root_without_split_folders_is_rejected(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(UserError, match="no split folders"):
        _build(tmp_path / "src", tmp_path)


@pytest.mark.parametrize("missing", ["images", "masks"])
def test_split_without_images_or_masks_folder_is_rejected(tmp_path, missing):
    split = tmp_path / "src" / "train"
    _write_object(split, "a", *_rectangle_object(30, 30))
    for path in (split / missing).iterdir():
        path.unlink()
    (split / missing).rmdir()
    with pytest.raises(UserError, match=f"has no {missing}/ folder"):
        _build(tmp_path / "src", tmp_path)


def test_split_with_empty_images_folder_is_rejected(tmp_path):
    split = tmp_path / "src" / "train"
    _write_object(split, "a", *_rectangle_object(30, 30))
    (split / "images" / "a.png").unlink()
    with pytest.raises(UserError, match="no files in .*images"):
        _build(tmp_path / "src", tmp_path)


def test_mask_without_its_image_is_rejected(tmp_path):
    split = tmp_path / "src" / "train"
    _write_object(split, "a", *_rectangle_object(30, 30))
    _write_object(split, "b", *_rectangle_object(30, 30))
    (split / "images" / "b.png").unlink()
    with pytest.raises(UserError, match="1 masks .* have no image .*b_thing_0.png"):
        _build(tmp_path / "src", tmp_path)


def test_mask_of_another_aspect_ratio_is_rejected(tmp_path):
    split = tmp_path / "src" / "train"
    image, mask = _rectangle_object(30, 30)
    _write_object(split, "a", image, mask[:, :48])
    with pytest.raises(UserError, match="a_thing_0.png .*a.png .*different aspect ratios"):
        _build(tmp_path / "src", tmp_path)


def test_mask_of_same_aspect_other_size_is_resized_to_its_image(tmp_path):
    image, mask = _rectangle_object(32, 24)
    _write_object(tmp_path / "full" / "train", "a", image, mask)
    _write_object(tmp_path / "half" / "train", "a", image, mask[::2, ::2])
    full = data.open_object_crops(tmp_path / "full", CONFIG, tmp_path / "tfds_full", "train")[0]
    half = data.open_object_crops(tmp_path / "half", CONFIG, tmp_path / "tfds_half", "train")[0]
    # The rectangle's corners are even, so the half mask scales back to the full one exactly.
    np.testing.assert_array_equal(full["mask"], half["mask"])
    np.testing.assert_array_equal(full["image"], half["image"])


def _root_with_a_corrupt_image(tmp_path: Path, n_good: int) -> Path:
    split = tmp_path / "src" / "train"
    for i in range(n_good):
        _write_object(split, f"good{i}", *_rectangle_object(30, 30))
    _write_object(split, "broken", *_rectangle_object(30, 30))
    (split / "images" / "broken.png").write_bytes(b"not a png at all")
    return tmp_path / "src"


def test_corrupt_image_over_the_bad_share_stops_the_build(tmp_path):
    root = _root_with_a_corrupt_image(tmp_path, n_good=3)
    with pytest.raises(UserError, match="1 of 4 objects have an unreadable .*images/broken.png"):
        _build(root, tmp_path)


def test_corrupt_image_within_the_bad_share_is_counted_not_replaced(tmp_path):
    root = _root_with_a_corrupt_image(tmp_path, n_good=3)
    tolerant = dataclasses.replace(CONFIG, max_bad_fraction=0.5)
    assert _build(root, tmp_path, tolerant) == {"train": 3}
    metadata = data.ObjectCrops(config=tolerant, data_dir=tmp_path / "tfds").info.metadata
    assert metadata["unreadable"] == {"train": 1}


def test_hostile_files_are_counted_unreadable_and_logged_by_name(tmp_path, caplog):
    split = tmp_path / "src" / "train"
    for i in range(3):
        _write_object(split, f"good{i}", *_rectangle_object(30, 30))
    _write_object(split, "bomb", *_rectangle_object(30, 30))
    _write_object(split, "nomask", *_rectangle_object(30, 30))
    # A PNG claiming 9000 x 9000 pixels (over MAX_PIXELS), and an empty mask file.
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))
    (split / "images" / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    (split / "masks" / "nomask_thing_0.png").write_bytes(b"")
    tolerant = dataclasses.replace(CONFIG, max_bad_fraction=0.5)
    assert _build(tmp_path / "src", tmp_path, tolerant) == {"train": 3}
    metadata = data.ObjectCrops(config=tolerant, data_dir=tmp_path / "tfds").info.metadata
    assert metadata["unreadable"] == {"train": 2}
    assert "refused image " in caplog.text
    assert "bomb.png: 9000 x 9000 = 81000000 pixels" in caplog.text
    assert "nomask_thing_0.png: the file is empty (0 bytes)" in caplog.text


def test_split_emptied_by_the_filters_is_rejected(tmp_path):
    _write_object(tmp_path / "src" / "train", "a", *_rectangle_object(30, 30))
    _write_object(tmp_path / "src" / "test", "b", *_rectangle_object(4, 4))
    with pytest.raises(UserError, match="split test: no object of 1 passes the filters .*area 1"):
        _build(tmp_path / "src", tmp_path)


def test_unknown_split_is_rejected(source, built):
    with pytest.raises(UserError, match="no split 'validation'.*train"):
        data.open_object_crops(source, CONFIG, built[0], "validation")


def test_built_dataset_opens_without_its_source_folder(built, tmp_path, caplog):
    examples = data.open_object_crops(tmp_path / "moved", CONFIG, built[0], "test")
    assert len(examples) == N_TEST - 1
    assert "was built from" in caplog.text


def test_image_is_read_upright_from_its_exif_orientation(tmp_path):
    split = tmp_path / "src" / "train"
    image, mask = _rectangle_object(40, 20)
    image, mask = image[:, :48], mask[:, :48]  # 48 wide, 64 high as displayed
    _write_object(split, "a", image, mask)
    # Stored on its side; EXIF orientation 6 tells viewers to turn it 90 degrees clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    (split / "images" / "a.png").unlink()
    Image.fromarray(image).transpose(Image.ROTATE_90).save(split / "images" / "a.jpg",
                                                           exif=exif, quality=95)
    example = data.open_object_crops(tmp_path / "src", CONFIG, tmp_path / "tfds", "train")[0]
    inside = example["image"][example["mask"][..., 0] > 0]
    outside = example["image"][example["mask"][..., 0] == 0]
    assert inside.mean() > 240 and outside.mean() < 110


# ---------------------------------------------------------------------------- the toy world


def test_cli_writes_the_openimages_layout(tmp_path):
    td.main([str(tmp_path / "out"), "--train", "3", "--test", "2", "--seed", "1", "--size", "48"])
    for split, n in (("train", 3), ("test", 2)):
        images = sorted((tmp_path / "out" / split / "images").iterdir())
        masks = sorted((tmp_path / "out" / split / "masks").iterdir())
        assert len(images) == len(masks) == n
        for image, mask in zip(images, masks):
            assert data.parse_mask_name(mask).image_id == image.stem
            assert Image.open(image).size == Image.open(mask).size == (48, 48)
    assert not (tmp_path / "out" / "train" / data.BOXES_CSV).exists()
    with open(tmp_path / "out" / "test" / data.BOXES_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["MaskPath"] for r in rows] == [m.name for m in masks]
    box = data.mask_box(np.asarray(Image.open(masks[0])) > 0)
    assert float(rows[0]["BoxXMin"]) * 48 == box.x0 and float(rows[0]["BoxYMax"]) * 48 == box.y1


def test_writer_refuses_a_folder_with_earlier_objects(tmp_path):
    td.write_toyworld_objects(tmp_path, 2, 0, seed=0, size=32)
    with pytest.raises(UserError, match="already holds files"):
        td.write_toyworld_objects(tmp_path, 2, 0, seed=0, size=32)


def test_held_out_scenes_are_never_pretraining_scenes():
    scenes = [td.sample_held_out_scene(np.random.default_rng([0, i])) for i in range(100)]
    assert all(is_held_out(s) for s in scenes)
    assert {s.shape for s in scenes} >= {"crescent", "arrow", "bolt", "circle"}


def test_toyworld_config_scales_the_pixel_settings():
    config = td.toyworld_config(128)
    assert (config.crop_size, config.min_side, config.pad_min, config.pad_max) == (64, 12, 1, 2)
    assert (config.min_area, config.max_area, config.min_aspect) == (0.02, 0.8, 0.5)
