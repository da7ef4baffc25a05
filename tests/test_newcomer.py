"""A newcomer's first runs on the shipped toy model: the concept is their own folder (its name
the placeholder; the super-category a choice the error helps with), words the model cannot
read are named once, and a run that succeeds prints no warning they cannot act on.

Bad input ends before anything compiles (seconds); one short training run and one sampling
run of its concept are the cost (~1 min cold on 2 cores).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import error_line

from spacetime_jax.models.builtin import ASSETS

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
COMPILED_MARK = "step compiled"
WORLD_NOUNS = "circle, square, triangle, star, hexagon, diamond, cross, ring, heart"
# Two steps, one validation grid at the end on a prompt with a word the world never had.
SHORT_RUN = ["--config.train.steps=2", "--config.train.grad_accum=1",
             "--config.train.checkpoint_every=2", "--config.validation.every=2",
             "--config.validation.steps=2", "--config.validation.seeds=(0,)",
             "--config.validation.prompts=('a photo of a {} on a beach',)"]


def run_main(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPACETIME_JAX_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "spacetime_jax.main", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def load_config(name: str, variant: str):
    from spacetime_jax.cli import builtin_configs, load_config_module
    return load_config_module(builtin_configs()[name]).get_config(variant)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def my_cat(tmp_path_factory) -> Path:
    """A user's folder of photos, its name with a space."""
    folder = tmp_path_factory.mktemp("photos") / "my cat"
    shutil.copytree(ASSETS / "concepts" / "crescent", folder)
    return folder


def own_folder_args(workdir: Path, images: Path, *overrides: str) -> list[str]:
    return ["--config=configs/neti.py:tiny", f"--workdir={workdir}",
            f"--config.data.images={images}", *overrides]


# --- The concept comes from the user's folder.

def test_the_placeholder_is_the_folders_name_and_the_demo_is_the_bundled_crescent(my_cat):
    from spacetime_jax.neti.train import concept_specs
    tiny = load_config("neti", "tiny")
    assert (tiny.data.images, tiny.concept.placeholder, tiny.concept.super_category) == ("", "",
                                                                                          "")
    tiny.data.images = str(my_cat)
    (spec,) = concept_specs(tiny)
    assert (spec.placeholder, spec.name) == ("<my-cat>", "my-cat")

    (demo,) = concept_specs(load_config("neti", "demo"))
    assert (demo.placeholder, demo.super_category) == ("<crescent>", "circle")
    assert demo.images == str(ASSETS / "concepts" / "crescent")
    batch = load_config("neti_batch", "tiny")  # inherits tiny: sub-folders name their concepts
    assert batch.model == "builtin:toyworld" and "placeholder" not in batch.concept


def test_a_missing_super_category_names_the_folders_placeholder_and_the_worlds_nouns(my_cat,
                                                                                     cache,
                                                                                     tmp_path):
    result = run_main(own_folder_args(tmp_path / "run", my_cat), cache)
    assert result.returncode == 2
    line = error_line(result)
    assert line == (f"error: concept 'my-cat' ({my_cat}): no super-category: say what "
                    "<my-cat> is in one word of the model's vocabulary, "
                    "--config.concept.super_category=WORD (one-token nouns of this model: "
                    f"{WORLD_NOUNS})")
    assert "crescent" not in line
    assert COMPILED_MARK not in result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("word, offer", [
    ("object", f"is 6 tokens; it must be exactly one (one-token words of this model: "
               f"{WORLD_NOUNS})"),
    ("stars", "is 3 tokens; it must be exactly one (one-token words like it: star)"),
])
def test_a_super_category_of_several_tokens_is_offered_one_token_words(my_cat, cache, tmp_path,
                                                                       word, offer):
    result = run_main(own_folder_args(tmp_path / "run", my_cat,
                                      f"--config.concept.super_category={word}"), cache)
    assert result.returncode == 2
    assert (f"concept 'my-cat' ({my_cat}): super-category '{word}' {offer}"
            in error_line(result))
    assert COMPILED_MARK not in result.stdout


# --- A short run of the user's concept, then sampling it.

@pytest.fixture(scope="module")
def trained(my_cat, cache, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained")
    result = run_main(own_folder_args(workdir, my_cat, "--config.concept.super_category=circle",
                                      *SHORT_RUN), cache)
    return result, workdir


def test_a_run_on_the_users_folder_writes_a_concept_named_after_it(trained):
    result, workdir = trained
    assert result.returncode == 0, result.stderr
    concept = json.loads((workdir / "concept" / "concept.json").read_text())
    assert (concept["placeholder"], concept["super_category"]) == ("<my-cat>", "circle")
    assert concept["train_config"]["model_revision"] == ""  # the revision it was trained on
    assert (workdir / "validation" / "step_000002" / "my-cat.png").is_file()


def test_a_successful_run_warns_once_of_unknown_words_and_of_nothing_else(trained):
    result, _ = trained
    assert result.returncode == 0, result.stderr
    # No absl, orbax, jax or tfds lines: stderr holds the one warning the prompt earned.
    assert result.stderr.splitlines() == [
        "warning: validation.prompts: builtin:toyworld never saw 'beach' in pretraining (it "
        "knows the toy world's shapes, colors, sizes, textures and backgrounds, as in "
        "configs/sample.py:tiny); the images may not follow those words"]


def test_sampling_with_the_reference_prompts_on_the_toy_model_names_their_unknown_words(
        trained, cache, tmp_path):
    _, workdir = trained
    result = run_main(["--config=configs/sample.py:neti", f"--workdir={tmp_path}",
                       f"--config.concept={workdir / 'concept'}", "--config.sample.steps=2",
                       "--config.sample.truncations=()"], cache)
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("warning: sample.prompts: builtin:toyworld never saw 'beach', "
                           "'app', 'icon', 'monet' in pretraining")
    assert (tmp_path / "grid_seed42.png").is_file()


def test_the_toy_sampling_variant_uses_only_the_worlds_words():
    from spacetime_jax.models.pretrained import load_model_tokenizer
    from spacetime_jax.models.builtin import resolve_builtin
    from spacetime_jax.models.tokenizer import model_words, unknown_words
    config = load_config("sample", "neti_tiny")
    toy = load_model_tokenizer(resolve_builtin("builtin:toyworld"))
    assert unknown_words(toy, config.sample.prompts, model_words("builtin:toyworld")) == []
    assert (config.model, config.sample.guidance_scale) == ("", 4.0)


def test_a_concept_samples_on_the_revision_it_was_trained_on_unless_told_otherwise():
    from types import SimpleNamespace

    from spacetime_jax.pipelines.sample_job import concept_model
    concept = SimpleNamespace(base_model="org/sd", train_config={"model_revision": "v2"})
    config = load_config("sample", "neti")
    assert concept_model(config, concept) == ("org/sd", "v2")
    config.model_revision = "v3"
    assert concept_model(config, concept) == ("org/sd", "v3")
    config.model, config.model_revision = "other/sd", ""
    assert concept_model(config, concept) == ("other/sd", "")  # another model: its default


def test_elite_training_names_validation_words_its_model_never_saw(capsys):
    from spacetime_jax.elite.sample import load_model
    config = load_config("elite_global", "tiny")
    config.validation.prompts = ("a photo of a {} in the snow",)
    load_model(config)
    assert capsys.readouterr().err.startswith(
        "warning: validation.prompts: builtin:toyworld never saw 'snow' in pretraining")


# --- ELITE's data set: no tfds warning about a build that does not exist yet.

def test_building_the_elite_data_set_logs_no_missing_dataset_info_warning(tmp_path, caplog):
    from spacetime_jax.elite import data
    from spacetime_jax.elite import toyworld_data
    source = tmp_path / "objects"
    toyworld_data.write_toyworld_objects(source, 4, 2, seed=0, size=64)
    config = toyworld_data.toyworld_config(64, crop_size=32)
    builder = data.ObjectCrops(config=config, data_dir=str(tmp_path / "tfds"))
    with caplog.at_level(logging.WARNING):
        assert not builder.is_prepared()
        counts = data.build_object_crops(source, config, tmp_path / "tfds")
        assert data.ObjectCrops(config=config, data_dir=str(tmp_path / "tfds")).is_prepared()
    assert sum(counts.values()) > 0
    assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()]
