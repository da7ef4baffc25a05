"""The `elite_personalize` job on the shipped toy-world model with a freshly initialized
encoder: a folder of images in one batched run (outputs, sizes, summary), batching changing
nothing, lambda 0 being the global words alone, token_index "all" mattering, and every bad
input ending in one clear line (exit status 2, nothing written).

The sampler compiles once per shape (~20-60 s on 2 CPU cores): the runs share one batch size,
two steps, and only three shapes (local words, global words, all five words).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs.elite_personalize import get_config
from spacetime_jax.elite import personalize
from spacetime_jax.elite.artifact import save_encoder
from spacetime_jax.elite.encoder import init_mapper_params
from spacetime_jax.elite.params import cross_attention_kv, local_kv_init
from spacetime_jax.elite.train import load_model
from spacetime_jax.errors import UserError
from spacetime_jax.visualize import LABEL_HEIGHT, MIN_TILE
from tests.cli_helpers import error_line

REPO = Path(__file__).resolve().parents[1]
CRESCENTS = REPO / "spacetime_jax" / "assets" / "concepts" / "crescent"
TOY_MODEL = "builtin:toyworld"
SEEDS, SCALES, PROMPT = (0, 1), (0.0, 0.6), "a photo of a {} on a purple background"
# Two seeds of one prompt per image and lambda: every run below draws batches of 2 rows.
BATCH = 2


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Two encoder folders on the toy-world model from init params: both stages, global only."""
    folder = tmp_path_factory.mktemp("encoders")
    model_config = ml_collections.ConfigDict({
        "model": TOY_MODEL, "image_encoder": "", "compute_dtype": "float32",
        "placeholder": "S", "encoder": {"feature_layers": (4, 0, 1, 2, 3), "hidden_width": 32}})
    model = load_model(model_config)
    config = model.encoder_config
    unet = model.sd.unet_params
    global_stage = {"mapper": init_mapper_params(config, jax.random.key(0)),
                    "kv": cross_attention_kv(unet)}
    local_stage = {"mapper": init_mapper_params(config, jax.random.key(1), local=True),
                   "kv": local_kv_init(unet)}
    extra = {"placeholder": "S"}
    both = save_encoder(folder / "both", config, global_stage, local_stage, TOY_MODEL, extra)
    global_only = save_encoder(folder / "global", config, global_stage, None, TOY_MODEL, extra)
    return {"both": both, "global": global_only}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two toy photos and, per photo, a mask half its size (same aspect: resized nearest)."""
    folder = tmp_path_factory.mktemp("inputs")
    images, masks = folder / "images", folder / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("crescent_00.png", "crescent_01.png"):
        shutil.copy(CRESCENTS / name, images / name)
        side = Image.open(CRESCENTS / name).size[0] // 2
        mask = np.zeros((side, side), np.uint8)
        mask[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 255
        Image.fromarray(mask).save(masks / name)
    return images, masks


def job_config(encoder: Path, images: Path, masks: Path | str = "", **overrides):
    config = get_config("tiny")
    config.encoder = str(encoder)
    config.images = str(images)
    config.masks = str(masks)
    config.prompts = (PROMPT,)
    config.seeds = SEEDS
    config.local_scales = SCALES
    config.steps = 2
    config.batch_size = BATCH
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def batched(encoders, inputs, tmp_path_factory):
    images, masks = inputs
    workdir = tmp_path_factory.mktemp("batched")
    personalize.run(job_config(encoders["both"], images, masks), str(workdir))
    return workdir


def test_folder_of_images_runs_in_one_batched_job(batched):
    stems = ("crescent_00", "crescent_01")
    for stem in stems:
        files = sorted(p.name for p in (batched / stem).iterdir())
        assert files == sorted(f"0_{s}_l{l:g}.png" for s in SEEDS for l in SCALES)
        assert all(read(batched / stem / f).shape == (64, 64, 3) for f in files)
        grid = Image.open(batched / f"{stem}.png")
        # The input, then seeds x lambdas; toy tiles are enlarged to MIN_TILE. Strips: the
        # title, the column labels, the one prompt's label.
        assert grid.size == ((1 + len(SEEDS) * len(SCALES)) * MIN_TILE,
                             3 * LABEL_HEIGHT + MIN_TILE)
    summary = json.loads((batched / personalize.SUMMARY_FILE).read_text())
    assert summary["has_local"] is True
    assert summary["encode_seconds_per_image"] > 0
    assert summary["encode_seconds_per_image"] == pytest.approx(summary["encode_seconds"] / 2)
    assert len(summary["rows"]) == len(stems) * len(SEEDS) * len(SCALES)
    assert {r["file"] for r in summary["rows"]} == {
        f"{stem}/0_{s}_l{l:g}.png" for stem in stems for s in SEEDS for l in SCALES}
    assert [Path(i["mask"]).name for i in summary["images"]] == [f"{s}.png" for s in stems]
    # Different objects give different images from the same seed.
    assert np.abs(read(batched / "crescent_00" / "0_0_l0.6.png")
                  - read(batched / "crescent_01" / "0_0_l0.6.png")).mean() > 1.0


def test_an_image_alone_gives_what_it_gives_in_the_batch(batched, encoders, inputs, tmp_path):
    images, masks = inputs
    personalize.run(job_config(encoders["both"], images / "crescent_01.png",
                               masks / "crescent_01.png"), str(tmp_path))
    for s in SEEDS:
        for l in SCALES:
            name = f"crescent_01/0_{s}_l{l:g}.png"
            difference = np.abs(read(tmp_path / name) - read(batched / name))
            # The encoder pass of 1 vs 2 images differs in float rounding only: a pixel may
            # round the other way.
            assert difference.max() <= 1 and difference.mean() < 0.01, name


def test_lambda_zero_is_the_global_words_alone(batched, encoders, inputs, tmp_path):
    images, masks = inputs
    personalize.run(job_config(encoders["global"], images / "crescent_01.png",
                               masks / "crescent_01.png"), str(tmp_path))
    summary = json.loads((tmp_path / personalize.SUMMARY_FILE).read_text())
    assert summary["has_local"] is False and "ignored" in summary["note"]
    assert sorted(p.name for p in (tmp_path / "crescent_01").iterdir()) == [
        f"0_{s}_global.png" for s in SEEDS]
    for s in SEEDS:
        global_only = read(tmp_path / "crescent_01" / f"0_{s}_global.png")
        lambda_zero = read(batched / "crescent_01" / f"0_{s}_l0.png")
        difference = np.abs(global_only - lambda_zero)
        assert difference.max() <= 1 and difference.mean() < 0.01
    # ... while lambda 0.6 adds the local branch: a mean change of 0.31 (of 255) on toy world
    # v2 (0.5+ on v1), against under 0.01 between the two ways of running lambda 0 above.
    assert np.abs(read(batched / "crescent_01" / "0_0_l0.6.png")
                  - read(batched / "crescent_01" / "0_0_l0.png")).mean() > 0.1


def test_all_words_differ_from_the_primary_word(batched, encoders, inputs, tmp_path):
    images, masks = inputs
    personalize.run(job_config(encoders["both"], images / "crescent_01.png",
                               masks / "crescent_01.png", local_scales=(0.6,),
                               token_index="all"), str(tmp_path))
    for s in SEEDS:
        name = f"crescent_01/0_{s}_l0.6.png"
        assert np.abs(read(tmp_path / name) - read(batched / name)).mean() > 1.0


# --- Checks that need no model.

def test_token_index_is_the_primary_word_all_or_one_word():
    assert personalize.parse_token_index("0", 5) == 0
    assert personalize.parse_token_index("all", 5) is None
    assert personalize.parse_token_index("3", 5) == 3
    for bad in ("5", "-1", "first"):
        with pytest.raises(UserError, match="token_index"):
            personalize.parse_token_index(bad, 5)


def test_mask_of_the_same_aspect_is_resized_nearest(tmp_path):
    mask = np.zeros((20, 40), bool)
    mask[:, :10] = True  # the left quarter
    fitted = personalize.fit_mask(mask, tmp_path / "m.png", tmp_path / "i.png", (80, 40), 8)
    assert fitted.shape == (8, 8, 1)
    np.testing.assert_array_equal(fitted[..., 0], np.tile([1, 1, 0, 0, 0, 0, 0, 0], (8, 1)))


def test_images_folder_with_a_missing_mask_is_named(inputs, tmp_path):
    images, masks = inputs
    (tmp_path / "crescent_00.png").write_bytes((masks / "crescent_00.png").read_bytes())
    with pytest.raises(UserError, match="no mask in .* for crescent_01.png"):
        personalize.mask_paths(str(tmp_path), personalize.image_paths(str(images)))


# --- Bad input through the command line: one line, exit status 2, nothing written.

def _bad_image(folder: Path) -> dict:
    shutil.copy(CRESCENTS / "crescent_00.png", folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return {"images": folder}


def _empty_mask(folder: Path) -> dict:
    shutil.copy(CRESCENTS / "crescent_00.png", folder / "photo.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "mask.png")
    return {"images": folder / "photo.png", "masks": folder / "mask.png"}


def _wide_mask(folder: Path) -> dict:
    shutil.copy(CRESCENTS / "crescent_00.png", folder / "photo.png")
    Image.fromarray(np.full((64, 96), 255, np.uint8)).save(folder / "mask.png")
    return {"images": folder / "photo.png", "masks": folder / "mask.png"}


def _photo(folder: Path) -> dict:
    shutil.copy(CRESCENTS / "crescent_00.png", folder / "photo.png")
    return {"images": folder / "photo.png"}


BAD_INPUTS = {
    "unreadable image": (_bad_image, (), "cannot read image .*broken.png"),
    "empty mask": (_empty_mask, (), r"mask .*mask.png is empty"),
    "mask of another aspect": (_wide_mask, (), r"mask .*mask.png is 96x64 but image photo.png "
                                               r"is 64x64: a mask must have its image's aspect"),
    "negative lambda": (_photo, ("--config.local_scales=(0.6, -0.5)",),
                        r"lambda -0.5 must be a number >= 0"),
    "prompt without slot": (_photo, ("--config.prompts=('a photo of a cat',)",),
                            r"prompt 'a photo of a cat' must hold the object's slot '\{\}'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_status_2(case, encoders, tmp_path):
    make, flags, message = BAD_INPUTS[case]
    folder = tmp_path / "in"
    folder.mkdir()
    paths = make(folder)
    workdir = tmp_path / "out"
    args = [f"--config.{key}={value}" for key, value in paths.items()]
    env = dict(os.environ, SPACETIME_JAX_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [sys.executable, "-m", "spacetime_jax.main", "--config=configs/elite_personalize.py:tiny",
         f"--workdir={workdir}", f"--config.encoder={encoders['both']}", *args, *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert re.search(message, line), line
    assert not workdir.exists()
