"""The toy-world pretraining job: progress lines, the cached pretraining set, and the smoke
variant end to end through the command line (every stage lowers its loss on held-out data,
the exported folder loads here, in diffusers and in transformers, a rerun skips what is done).

The smoke run is one subprocess shared by the module; its XLA compilations are kept in
pytest's cache folder, so a second session of these tests does not compile again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from spacetime_jax.models.pretrained import load_stable_diffusion
from spacetime_jax.toyworld import dataset as toy_dataset
from spacetime_jax.toyworld import generate
from spacetime_jax.training.progress import Progress

REPO = Path(__file__).resolve().parents[1]
STAGES = ("clip", "vae", "unet")


# ---------------------------------------------------------------------------------------
# Progress


def test_progress_logs_every_n_steps_and_the_last_with_window_means(tmp_path):
    lines = []
    progress = Progress(total_steps=7, log_every=3, workdir=tmp_path, log=lines.append)
    returned = [progress.update(step, loss=float(step)) for step in range(1, 8)]
    assert [r is not None for r in returned] == [False, False, True, False, False, True, True]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 7]
    # Means of the losses since the previous line: (1, 2, 3), (4, 5, 6), (7,).
    assert [r["loss"] for r in records] == [2.0, 5.0, 7.0]
    assert all(r["steps_per_s"] > 0 for r in records)
    assert len(lines) == 3 and lines[0].startswith("step 3/7 loss 2 |") and "it/s" in lines[0]
    assert "eta" in lines[0]


def test_progress_takes_device_arrays_and_leaves_the_first_step_out_of_the_speed(tmp_path):
    lines = []
    progress = Progress(total_steps=2, log_every=1, log=lines.append)
    first = progress.update(1, loss=jnp.float32(0.5), accuracy=jnp.float32(1.0))
    second = progress.update(2, loss=jnp.float32(0.25), accuracy=jnp.float32(0.0))
    assert first["steps_per_s"] is None and "? it/s" in lines[0]
    assert second["loss"] == 0.25 and second["accuracy"] == 0.0 and second["steps_per_s"] > 0
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="not after the start step"):
        Progress(total_steps=10, log_every=1, start_step=4, log=lines.append).update(4)


def read_tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of every events file in `folder`, read from the TFRecord framing."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_progress_writes_the_same_scalars_to_tensorboard(tmp_path):
    progress = Progress(total_steps=4, log_every=2, workdir=tmp_path, log=lambda line: None)
    for step in range(1, 5):
        progress.update(step, loss=float(step))
    scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["loss"] == [(2, 1.5), (4, 3.5)]
    assert [step for step, _ in scalars["steps_per_s"]] == [2, 4]


# ---------------------------------------------------------------------------------------
# The pretraining set


def test_rendering_in_two_processes_gives_generates_examples():
    data = toy_dataset.render_pretraining_set(30, seed=5, processes=2, chunk=8)
    reference = generate(5, 30)
    np.testing.assert_array_equal(data.images, reference.images)
    np.testing.assert_array_equal(data.masks, reference.masks)
    assert data.captions == reference.captions


def test_pretraining_set_cache_round_trips_and_is_reused(tmp_path):
    lines = []
    first = toy_dataset.load_or_render(tmp_path, 20, seed=1, processes=1, log=lines.append)
    arrays_path, captions_path = toy_dataset.cache_paths(tmp_path, 20, 1, 64)
    assert arrays_path.is_file() and captions_path.is_file()
    assert not list(tmp_path.glob("*.partial"))
    again = toy_dataset.load_or_render(tmp_path, 20, seed=1, processes=1, log=lines.append)
    assert "rendering" in lines[0] and "rendered and cached in" in lines[1]
    assert "from the cache" in lines[2]
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.masks, first.masks)
    assert again.captions == first.captions and again.masks.dtype == bool
    assert first.masks.any(axis=(1, 2)).all()  # every image shows its object


def test_reconstruction_report_scores_outlines_and_finds_a_fixed_place_artifact():
    from spacetime_jax.toyworld.pretrain_vae import hot_spot_ratio, reconstruction_report
    examples = generate(seed=3, n=32)
    perfect = reconstruction_report(examples.images, examples.masks, examples.images)
    assert perfect["l1"] == 0.0 and perfect["silhouette_iou"] > 0.9
    assert perfect["hot_spot_ratio"] == 1.0
    # A smear at one fixed place in every image: the outlines survive, the error map shows it.
    smeared = examples.images.copy()
    smeared[:, 8:16, 8:16] = 255 - smeared[:, 8:16, 8:16]
    report = reconstruction_report(examples.images, examples.masks, smeared)
    assert report["hot_spot_ratio"] > 10 and report["l1"] > 0
    # An object blurred away reads back as no silhouette.
    background_only = np.repeat(examples.images[:, :1, :1], 64, 1).repeat(64, 2)
    assert reconstruction_report(examples.images, examples.masks,
                                 background_only)["silhouette_iou"] < 0.1
    assert hot_spot_ratio(np.ones((64, 64))) == pytest.approx(1.0)


def test_centering_moves_the_latent_means_into_the_weights_and_decodes_the_same():
    import ml_collections
    from spacetime_jax.models.vae import AutoencoderKL
    from spacetime_jax.toyworld.pretrain_vae import (center_latents, init_params,
                                                     latent_channel_means, vae_config)
    config = ml_collections.ConfigDict(dict(channels=(8, 8), layers_per_block=1,
                                            norm_num_groups=4))
    model = AutoencoderKL(vae_config(config, 16))
    params = jax.tree.map(np.asarray, init_params(model, 16, seed=0))
    images = generate(seed=5, n=8).images[:, ::4, ::4]
    channel_means = latent_channel_means(model, params, images)
    assert np.abs(channel_means).max() > 1e-3  # random weights: something to move
    centered = center_latents(params, channel_means)
    np.testing.assert_allclose(latent_channel_means(model, centered, images), 0, atol=1e-5)

    def apply(p, method, x):
        return model.apply({"params": p}, x, method=method)
    pixels = jnp.asarray(images, jnp.float32) / 127.5 - 1
    mean, logvar = apply(params, model.encode, pixels)
    centered_mean, centered_logvar = apply(centered, model.encode, pixels)
    np.testing.assert_allclose(centered_mean, mean - channel_means, atol=1e-5)
    np.testing.assert_array_equal(centered_logvar, logvar)
    np.testing.assert_allclose(apply(centered, model.decode, centered_mean),
                               apply(params, model.decode, mean), atol=1e-4)


def test_offset_noise_shifts_each_example_and_channel_by_one_draw():
    from spacetime_jax.toyworld.pretrain_unet import offset_noise
    key = jax.random.key(0)
    shape = (256, 32, 32, 4)
    plain = np.asarray(offset_noise(key, shape, 0.0))
    offset = np.asarray(offset_noise(key, shape, 0.5))
    shift = offset - plain  # the same pixel noise underneath, plus a constant per (example, channel)
    np.testing.assert_allclose(shift, shift[:, :1, :1, :] + np.zeros(shape), atol=1e-6)
    assert shift[:, 0, 0, :].std() == pytest.approx(0.5, rel=0.1)
    assert plain.mean(axis=(1, 2)).std() == pytest.approx(1 / 32, rel=0.1)


class _ZeroModel:
    """A denoiser that outputs zeros: the loss is then the weighted mean square target."""

    def apply(self, variables, noisy, timesteps, contexts):
        return jnp.zeros_like(noisy)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_loss_trains_on_the_named_target_with_its_min_snr_weights(prediction_type):
    from spacetime_jax.diffusion.schedules import (SchedulerConfig, ddpm_schedule,
                                                   min_snr_weights, training_target)
    from spacetime_jax.toyworld.pretrain_unet import noise_loss
    schedule = ddpm_schedule(SchedulerConfig())
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((4, 8, 8, 4)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((4, 8, 8, 4)), jnp.float32)
    t = jnp.array([10, 300, 700, 990])
    target = np.asarray(training_target(schedule, latents, noise, t, prediction_type))
    weights = np.asarray(min_snr_weights(schedule, t, 5.0, prediction_type))
    expected = np.mean(weights * (target ** 2).mean(axis=(1, 2, 3)))
    loss = noise_loss(_ZeroModel(), {}, schedule, latents, noise, t, None, 5.0, prediction_type)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # The other target gives another loss: the argument is used.
    other = "epsilon" if prediction_type == "v_prediction" else "v_prediction"
    assert float(noise_loss(_ZeroModel(), {}, schedule, latents, noise, t, None, 5.0,
                            other)) != pytest.approx(expected, rel=1e-3)


# ---------------------------------------------------------------------------------------
# The smoke run, end to end


def run_pretrain(workdir: Path, compilation_cache: Path) -> tuple[subprocess.CompletedProcess,
                                                                  float]:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(compilation_cache))
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "spacetime_jax.main",
         "--config=configs/toyworld_pretrain.py:smoke", f"--workdir={workdir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    return result, time.perf_counter() - start


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("toyworld_pretrain")
    cache = tmp_path_factory.mktemp("xla-compilation")
    first, first_seconds = run_pretrain(workdir, cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    rerun, rerun_seconds = run_pretrain(workdir, cache)
    summary = json.loads((workdir / "model" / "pretrain_summary.json").read_text())
    return dict(workdir=workdir, first=first, rerun=rerun, first_seconds=first_seconds,
                rerun_seconds=rerun_seconds, summary=summary)


@pytest.mark.parametrize("groups", ["5", "-1"])
def test_groups_that_do_not_divide_the_batch_are_one_line_before_any_work(tmp_path, groups):
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "spacetime_jax.main", "--config=configs/toyworld_pretrain.py:smoke",
         f"--workdir={workdir}", f"--config.clip.groups_per_batch={groups}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert (f"clip.groups_per_batch={groups} must be 0 (random batches) or divide "
            "clip.batch_size=32") in done.stderr
    assert "Traceback" not in done.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("override, message", [
    ("unet.prediction_type=sample",
     "unet.prediction_type='sample' is unknown; use one of ('epsilon', 'v_prediction')"),
    ("unet.timestep_logit_std=-1",
     "unet.timestep_logit_std=-1.0 is negative; use 0 (uniform timesteps) or a positive spread"),
])
def test_bad_unet_settings_are_one_line_before_any_work(tmp_path, override, message):
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "spacetime_jax.main", "--config=configs/toyworld_pretrain.py:smoke",
         f"--workdir={workdir}", f"--config.{override}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not workdir.exists()


def test_smoke_run_trains_every_stage_in_order(smoke):
    out = smoke["first"].stdout
    positions = [out.index(f"{stage}: training") for stage in STAGES]
    assert positions == sorted(positions)
    assert "16 cross-attention layers" in out
    assert "clip: each batch 8 (object color, background color) groups of 4" in out
    for stage in STAGES:
        assert (smoke["workdir"] / stage / "done.json").is_file()
    for stage in ("vae", "unet"):
        records = (smoke["workdir"] / stage / "metrics.jsonl").read_text().splitlines()
        assert json.loads(records[-1])["step"] == 30


def test_each_stage_lowers_its_loss(smoke):
    stages = smoke["summary"]["stages"]
    # CLIP: contrastive loss of held-out (image, caption) batches.
    assert stages["clip"]["heldout_loss_after"] < 0.9 * stages["clip"]["heldout_loss_before"]
    assert 0.0 <= stages["clip"]["shape_accuracy"] <= 1.0
    # VAE: L1 reconstruction of held-out images (posterior means), at init and after.
    assert stages["vae"]["heldout_l1_after"] < 0.9 * stages["vae"]["heldout_l1_before"]
    # U-Net: noise loss of the EMA params on fixed held-out (latents, noise, timesteps).
    assert stages["unet"]["heldout_loss_after"] < 0.9 * stages["unet"]["heldout_loss_before"]


def test_scaling_factor_gives_latents_unit_variance(smoke):
    scaling_factor = smoke["summary"]["stages"]["vae"]["scaling_factor"]
    with np.load(smoke["workdir"] / "vae" / "latent_moments.npz") as moments:
        means, logvars = moments["means"], moments["logvars"]
    noise = np.random.default_rng(0).standard_normal(means.shape)
    latents = (means + np.exp(0.5 * logvars) * noise) * scaling_factor
    assert latents.shape[1:] == (8, 8, 4)
    assert abs(latents.std() - 1.0) < 0.05
    # The smoke config centers the latents: each channel's mean is folded into the weights.
    assert np.abs(means.mean(axis=(0, 1, 2))).max() * scaling_factor < 0.05


def test_exported_model_loads_here_in_diffusers_and_in_transformers(smoke):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModel

    model_dir = smoke["workdir"] / "model"
    sd = load_stable_diffusion(model_dir)
    assert sd.num_cross_attention_layers == 16
    assert sd.unet.config.cross_attention_dim == sd.text_encoder.config.hidden_size
    assert sd.vae_config.scaling_factor == pytest.approx(
        smoke["summary"]["stages"]["vae"]["scaling_factor"], rel=1e-6)

    torch_unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    ours = np.asarray(sd.unet_params["conv_in"]["kernel"])  # HWIO
    theirs = torch_unet.conv_in.weight.detach().float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(ours, theirs)
    assert sum(p.numel() for p in torch_unet.parameters()) == sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(sd.unet_params))

    vision = CLIPVisionModel.from_pretrained(model_dir / "image_encoder")
    side = vision.config.image_size
    with torch.no_grad():
        hidden = vision(torch.zeros(1, 3, side, side, dtype=vision.dtype)).last_hidden_state
    assert hidden.shape == (1, (side // vision.config.patch_size) ** 2 + 1,
                            vision.config.hidden_size)
    assert torch.isfinite(hidden).all()


def test_validation_writes_a_grid_and_a_prompt_following_score(smoke):
    grid = Image.open(smoke["workdir"] / "grid.png")
    assert grid.size[0] == 2 * 128  # two seeds, tiles enlarged to 128 px
    validation = smoke["summary"]["validation"]
    assert validation["samples"] == 8 and validation["chance"] == 1 / 8
    for key in ("background_color_accuracy", "object_color_accuracy", "shape_accuracy",
                "size_accuracy"):
        assert 0.0 <= validation[key] <= 1.0
    reconstruction = smoke["summary"]["stages"]["vae"]["heldout_reconstruction"]
    assert 0.0 <= reconstruction["silhouette_iou"] <= 1.0
    assert reconstruction["hot_spot_ratio"] >= 1.0
    assert "prompt following on 8 samples" in smoke["first"].stdout
    denoising = validation["one_step_denoising"]
    assert [d["timestep"] for d in denoising] == [0, 200, 400, 600, 800]
    assert denoising[0]["latent_rmse"] == 0.0
    assert all(0.0 <= d["iou"] <= 1.0 and 0.0 <= d["shape_accuracy"] <= 1.0 for d in denoising)
    assert all(d["latent_rmse"] > 0.0 for d in denoising[1:])
    assert "one step of denoising, 8 held-out renders: t=0 IoU" in smoke["first"].stdout


def test_rerun_on_a_finished_workdir_skips_every_stage(smoke):
    rerun = smoke["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for stage in STAGES:
        assert f"{stage}: finished earlier" in rerun.stdout
    assert "export and validation: finished earlier" in rerun.stdout
    assert "training" not in rerun.stdout and "rendering" not in rerun.stdout
    assert smoke["rerun_seconds"] < smoke["first_seconds"] / 3
