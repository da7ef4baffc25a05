"""Every user path may be a bucket: each reader and writer gives on a gs:// path (the local GCS
emulator) exactly what it gives on a local one."""
from __future__ import annotations

import io
import types
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from spacetime_jax.data import latents
from spacetime_jax.data.images import ImageError, load_concept_images
from spacetime_jax.elite import data
from spacetime_jax.elite import personalize
from spacetime_jax.elite import toyworld_data as td
from spacetime_jax.elite.artifact import LOCAL_FILE, load_encoder, save_encoder
from spacetime_jax.elite.encoder import EncoderConfig, init_mapper_params
from spacetime_jax.elite.importer import load_state_dict_file
from spacetime_jax.models.pretrained import load_clip_vision, load_stable_diffusion
from spacetime_jax.models.tokenizer import tokenize
from spacetime_jax.neti.batch import read_concept_set
from spacetime_jax.neti.concept import Concept, load_concept, save_concept
from spacetime_jax.neti.mapper import MapperConfig
from spacetime_jax.paths import copy_tree
from spacetime_jax.tools.make_tiny_model import make_tiny_model
from spacetime_jax.visualize import LABEL_HEIGHT, save_grid

EXIF_ORIENTATION = 0x0112
CROPS = td.toyworld_config(64, crop_size=32)


@pytest.fixture
def bucket(gcs):
    """A fresh gs:// folder per test (the emulator lives for the whole session)."""
    return gcs.path(f"t-{uuid.uuid4().hex[:8]}")


def _upload(local: Path, bucket) -> str:
    copy_tree(local, bucket / local.name)
    return str(bucket / local.name)


def _gradient(width: int, height: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1),
                     (x + y + 40 * seed) % 256], -1).astype(np.uint8)


def _tree_equal(a, b) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(leaves_a, leaves_b))


# ---------------------------------------------------------------------------------------
# Concept images and concept sets.

@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A JPEG turned by its EXIF orientation, a transparent PNG and a file that is no image."""
    folder = tmp_path_factory.mktemp("photos") / "cat"
    folder.mkdir()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(_gradient(32, 16, 0)).save(folder / "a.jpg", quality=95,
                                               exif=exif.tobytes())
    rgba = np.concatenate([_gradient(24, 24, 1), np.full((24, 24, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_concept_images_from_a_bucket_equal_the_local_ones(photos, bucket):
    local_images, local_paths = load_concept_images(photos, 16)
    remote_images, remote_paths = load_concept_images(_upload(photos, bucket), 16)
    assert remote_images.tobytes() == local_images.tobytes()
    assert [p.name for p in remote_paths] == [p.name for p in local_paths] == ["a.jpg", "b.png"]
    assert all(str(p).startswith("gs://") for p in remote_paths)


def test_truncated_image_in_a_bucket_is_named(photos, bucket):
    folder = bucket / "broken"
    folder.mkdir(parents=True)
    (folder / "cut.png").write_bytes((photos / "b.png").read_bytes()[:60])
    with pytest.raises(ImageError, match=r"cannot read image gs://.*/broken/cut.png"):
        load_concept_images(str(folder), 16)


def test_concept_set_folder_in_a_bucket(photos, bucket, tmp_path):
    concepts = tmp_path / "set"
    for name in ("cat", "my dog"):
        copy_tree(photos, concepts / name)
    remote = _upload(concepts, bucket)
    specs = read_concept_set(remote, "animal")
    assert [(s.name, s.placeholder, s.super_category) for s in specs] == [
        ("cat", "<cat>", "animal"), ("my-dog", "<my-dog>", "animal")]
    assert [s.images for s in specs] == [f"{remote}/cat", f"{remote}/my dog"]
    images, _ = load_concept_images(specs[1].images, 16)
    assert images.tobytes() == load_concept_images(photos, 16)[0].tobytes()


def test_concept_set_manifest_in_a_bucket(photos, bucket, tmp_path):
    concepts = tmp_path / "listed"
    copy_tree(photos, concepts / "images" / "cat")
    (concepts / "concepts.csv").write_text(
        "folder, placeholder, super-category, property\n"
        "# the cat\n"
        "images/cat, <cat>, cat, object\n"
        f"{bucket}/elsewhere, <style>, painting, style\n")
    remote = _upload(concepts, bucket)
    for path in (remote, f"{remote}/concepts.csv"):
        specs = read_concept_set(path, "ignored")
        assert [(s.images, s.placeholder, s.super_category, s.learnable_property)
                for s in specs] == [(f"{remote}/images/cat", "<cat>", "cat", "object"),
                                    (f"{bucket}/elsewhere", "<style>", "painting", "style")]


# ---------------------------------------------------------------------------------------
# Models and the latent cache.

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "sd1", vision=True)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_stable_diffusion(tiny_dir)


def test_model_folder_in_a_bucket_loads_like_the_local_one(tiny_dir, tiny, bucket):
    remote = _upload(Path(tiny_dir), bucket)
    sd = load_stable_diffusion(remote)
    for name in ("unet_params", "vae_params", "text_params"):
        assert _tree_equal(getattr(sd, name), getattr(tiny, name)), name
    assert sd.unet.config == tiny.unet.config and sd.vae_config == tiny.vae_config
    assert sd.scheduler_config == tiny.scheduler_config
    prompts = ["a photo of a cat on the beach", "monet painting of a zebra"]
    np.testing.assert_array_equal(tokenize(sd.tokenizer, prompts),
                                  tokenize(tiny.tokenizer, prompts))
    assert sd.tokenizer.get_vocab() == tiny.tokenizer.get_vocab()
    vision, vision_params = load_clip_vision(f"{remote}/image_encoder")
    local_vision, local_params = load_clip_vision(Path(tiny_dir) / "image_encoder")
    assert vision.config == local_vision.config and _tree_equal(vision_params, local_params)


def test_latent_cache_is_written_to_and_read_from_a_bucket(tiny, bucket, tmp_path,
                                                           monkeypatch):
    images = np.stack([_gradient(16, 16, seed) for seed in range(3)])
    args = (tiny.vae, tiny.vae_params, images, "tiny")
    local = latents.concept_latent_cache(tmp_path, *args)
    written = latents.concept_latent_cache(str(bucket), *args)
    assert (bucket / latents.CACHE_NAME).is_file()
    monkeypatch.setattr(latents, "encode_moments", lambda *a, **k: pytest.fail("recomputed"))
    read = latents.concept_latent_cache(bucket, *args)
    for moments in (written, read):
        np.testing.assert_array_equal(moments.mean, local.mean)
        np.testing.assert_array_equal(moments.logvar, local.logvar)


# ---------------------------------------------------------------------------------------
# Artifacts and outputs.

def test_concept_artifact_round_trips_through_a_bucket(bucket):
    rng = np.random.default_rng(0)
    variables = {"params": {"dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                                      "bias": np.zeros(3, np.float32)}},
                 "encoding": {"W": rng.normal(size=(8, 2)).astype(np.float32)}}
    concept = Concept(kind="neti", mapper_config=MapperConfig(token_dim=3, hidden_width=4),
                      variables=variables, placeholder="<cat>", super_category="cat",
                      target_norm=0.5, base_model="builtin:toyworld",
                      train_config={"steps": 3})
    folder = save_concept(str(bucket / "concept"), concept)
    assert str(folder) == str(bucket / "concept")
    loaded = load_concept(folder)
    assert _tree_equal(loaded.variables, variables)
    assert (loaded.mapper_config, loaded.placeholder, loaded.target_norm, loaded.train_config) \
        == (concept.mapper_config, "<cat>", 0.5, {"steps": 3})


def _kv(leaves: tuple[str, str]) -> dict:
    kernels = {leaf: {"kernel": np.full((4, 8), i, np.float32)} for i, leaf in enumerate(leaves)}
    return {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn2": kernels}}}}


def test_encoder_artifact_round_trips_through_a_bucket(bucket):
    config = EncoderConfig(feature_layers=(2, 0, 1), vision_width=8, hidden_width=8, word_dim=8)
    global_stage = {"mapper": jax.device_get(init_mapper_params(config, jax.random.key(0))),
                    "kv": _kv(("to_k", "to_v"))}
    local_stage = {"mapper": jax.device_get(init_mapper_params(config, jax.random.key(1),
                                                               local=True)),
                   "kv": _kv(("to_k_local", "to_v_local"))}
    folder = bucket / "encoder"
    save_encoder(str(folder), config, global_stage, local_stage, "builtin:toyworld",
                 {"placeholder": "S"})
    loaded = load_encoder(folder)
    assert loaded.config == config and loaded.extra == {"placeholder": "S"}
    assert _tree_equal(loaded.global_params, global_stage)
    assert _tree_equal(loaded.local_params, local_stage)
    save_encoder(folder, config, global_stage, None, "builtin:toyworld")
    assert not (folder / LOCAL_FILE).exists() and load_encoder(folder).local_params is None


def test_grid_written_to_a_bucket_decodes(bucket):
    images = np.stack([_gradient(8, 8, seed) for seed in range(6)])
    path = save_grid(str(bucket / "grids" / "step_1.png"), images, rows=2, cols=3,
                     col_labels=["a", "b", "c"], scale=1)
    decoded = np.asarray(Image.open(io.BytesIO(path.read_bytes())))
    assert decoded.shape == (LABEL_HEIGHT + 2 * 8, 3 * 8, 3)
    np.testing.assert_array_equal(decoded[LABEL_HEIGHT + 8:, 16:], images[5])


def test_official_state_dict_is_read_from_a_bucket(bucket):
    state = {"mapping_0.0.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (bucket / "global_mapper.pt").write_bytes(buffer.getvalue())
    loaded = load_state_dict_file(str(bucket / "global_mapper.pt"))
    np.testing.assert_array_equal(loaded["mapping_0.0.weight"], state["mapping_0.0.weight"])


# ---------------------------------------------------------------------------------------
# ELITE: the object-crop source, the tfds data_dir, personalization inputs.

@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("objects") / "src"
    td.write_toyworld_objects(root, 4, 2, seed=3, size=64)
    return root


def _all_examples(root, data_dir) -> dict[str, list[dict]]:
    splits = data.build_object_crops(root, CROPS, data_dir)
    out = {}
    for split in sorted(splits):
        source = data.open_object_crops(root, CROPS, data_dir, split)
        out[split] = [source[i] for i in range(len(source))]
    return out


def _assert_same_examples(got: dict, want: dict) -> None:
    assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in want.items()}
    for split in want:
        for a, b in zip(got[split], want[split]):
            assert a["object_id"] == b["object_id"] and a["label"] == b["label"]
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["mask"], b["mask"])


def test_object_crops_from_a_bucket_source_equal_the_local_ones(objects, bucket, tmp_path):
    want = _all_examples(objects, tmp_path / "local_tfds")
    remote = _upload(objects, bucket)
    got = _all_examples(remote, tmp_path / "remote_tfds")
    _assert_same_examples(got, want)
    built = data.ObjectCrops(config=CROPS, data_dir=str(tmp_path / "remote_tfds"))
    assert built.info.metadata["source"] == remote


def test_object_crops_built_into_a_bucket_data_dir_reopen_from_it(objects, bucket, tmp_path,
                                                                  monkeypatch):
    want = _all_examples(objects, tmp_path / "local_tfds")
    data_dir = str(bucket / "tfds")
    _assert_same_examples(_all_examples(objects, data_dir), want)
    assert data.ObjectCrops(config=CROPS, data_dir=data_dir).is_prepared()
    # Another process: no local copy yet, and the source is gone; the bucket's build is used.
    monkeypatch.setattr(data, "_LOCAL_COPIES", {})
    monkeypatch.setattr(data, "_build", lambda *a: pytest.fail("rebuilt"))
    _assert_same_examples(_all_examples(tmp_path / "gone", data_dir), want)


def test_personalization_images_and_masks_in_a_bucket_read_like_local(photos, bucket,
                                                                       tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for name, (w, h) in (("a.png", (8, 16)), ("b.png", (12, 12))):  # a.jpg is 16 x 32 upright
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4:, : w // 2] = 255
        Image.fromarray(mask).save(masks / name)
    images = tmp_path / "images"
    copy_tree(photos, images)
    (images / "notes.txt").unlink()
    local = personalize.load_subjects(types.SimpleNamespace(images=str(images),
                                                            masks=str(masks)))
    remote = personalize.load_subjects(types.SimpleNamespace(images=_upload(images, bucket),
                                                             masks=_upload(masks, bucket)))
    assert [(s.path.name, s.mask_path.name) for s in remote] == [("a.jpg", "a.png"),
                                                                 ("b.png", "b.png")]
    for r, lo in zip(remote, local):
        assert str(r.path).startswith("gs://")
        np.testing.assert_array_equal(r.image, lo.image)
        np.testing.assert_array_equal(r.mask, lo.mask)
