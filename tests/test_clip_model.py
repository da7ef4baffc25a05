"""CLIPModel (both towers, projections, logit scale) and its contrastive loss: parity with
transformers' PyTorch CLIPModel, strict weight round trips and config.json round trips."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from spacetime_jax.models import convert
from spacetime_jax.models.clip import (CLIPModel, CLIPModelConfig, clip_param_template,
                                       contrastive_loss)
from spacetime_jax.models.clip_text import CLIPTextConfig
from spacetime_jax.models.config_utils import UnsupportedArchitectureError
from spacetime_jax.models.tiny_configs import TINY_CLIP_TEXT, TINY_CLIP_VISION
from tests.torch_reference import randomize_, state_dict_numpy

ATOL = 1e-4
PROJECTION_DIM = 24  # differs from both towers' widths, so a transposed kernel cannot pass
TINY_CLIP = {"model_type": "clip", "text_config": TINY_CLIP_TEXT,
             "vision_config": TINY_CLIP_VISION, "projection_dim": PROJECTION_DIM}


def max_abs_diff(ours, theirs) -> float:
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))


def caption_ids(lengths=(4, 9, 6), seq_len: int = 77, seed: int = 0) -> np.ndarray:
    """bos, random words, eos, eos padding (the tiny text config's special ids)."""
    rng = np.random.default_rng(seed)
    bos, eos = TINY_CLIP_TEXT["bos_token_id"], TINY_CLIP_TEXT["eos_token_id"]
    rows = []
    for n in lengths:
        row = [bos, *rng.integers(2, bos, size=n), eos]
        rows.append(row + [eos] * (seq_len - len(row)))
    return np.asarray(rows, np.int32)


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    # randomize_ perturbs every parameter, LayerNorms and logit_scale included.
    torch_model = randomize_(transformers.CLIPModel(transformers.CLIPConfig(**TINY_CLIP)),
                             seed=1)
    config = CLIPModelConfig.from_dict(TINY_CLIP)
    model = CLIPModel(config)
    state_dict = state_dict_numpy(torch_model)
    params = convert.torch_to_flax(state_dict, clip_param_template(config), what="CLIP")
    size = config.vision.image_size
    pixels = np.random.default_rng(2).standard_normal((3, size, size, 3)).astype(np.float32)
    ids = caption_ids()
    outputs = jax.jit(lambda p, i, x: (model.apply({"params": p}, i, x),
                                       model.apply({"params": p}, i, method=model.text_features),
                                       model.apply({"params": p}, x,
                                                   method=model.image_features)))
    (logits_per_image, logits_per_text), text_features, image_features = outputs(params, ids,
                                                                                 pixels)
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.from_numpy(ids).long(),
                             pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2),
                             return_loss=True)
    return dict(torch_model=torch_model, config=config, model=model, params=params,
                state_dict=state_dict, ids=ids, pixels=pixels, theirs=theirs,
                logits_per_image=logits_per_image, logits_per_text=logits_per_text,
                text_features=text_features, image_features=image_features)


def test_logits_match_transformers(case):
    theirs = case["theirs"]
    # Reached (fp32, CPU): 1.8e-6 on logits of magnitude up to ~4.3; the loss to 1e-7.
    assert max_abs_diff(case["logits_per_image"], theirs.logits_per_image) <= ATOL
    assert max_abs_diff(case["logits_per_text"], theirs.logits_per_text) <= ATOL
    assert max_abs_diff(case["text_features"], theirs.text_embeds) <= ATOL
    assert max_abs_diff(case["image_features"], theirs.image_embeds) <= ATOL
    np.testing.assert_allclose(np.linalg.norm(case["text_features"], axis=-1), 1.0, atol=1e-5)
    # The logits are not trivially alike: random towers give distinct similarities.
    assert np.ptp(np.asarray(case["logits_per_image"])) > 0.1


def test_contrastive_loss_equals_transformers_return_loss(case):
    ours = float(contrastive_loss(case["logits_per_image"]))
    assert abs(ours - float(case["theirs"].loss)) <= ATOL
    # Symmetric: the same from either side.
    assert abs(float(contrastive_loss(case["logits_per_text"])) - ours) <= 1e-6


def test_contrastive_loss_bounds():
    batch = 5
    assert float(contrastive_loss(np.zeros((batch, batch)))) == pytest.approx(np.log(batch))
    assert float(contrastive_loss(100.0 * np.eye(batch))) < 1e-6
    # Pairing image i with caption i+1 is the worst case for those logits.
    assert float(contrastive_loss(100.0 * np.roll(np.eye(batch), 1, axis=1))) > 90.0


def test_params_load_strictly_into_transformers(case):
    state_dict = convert.flax_to_torch(case["params"])
    assert {"logit_scale", "text_projection.weight", "visual_projection.weight"} <= set(state_dict)
    # A scalar, as in PyTorch (torch would quietly accept shape (1,) here, safetensors not).
    assert state_dict["logit_scale"].shape == ()
    fresh = transformers.CLIPModel(transformers.CLIPConfig(**TINY_CLIP))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    for key, value in case["torch_model"].state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert state_dict["text_projection.weight"].shape == (PROJECTION_DIM,
                                                          TINY_CLIP_TEXT["hidden_size"])


def test_saved_folder_loads_in_transformers_and_config_round_trips(case, tmp_path):
    config = case["config"]
    save_file(convert.flax_to_torch(case["params"]), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    loaded = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    assert loaded.config.projection_dim == PROJECTION_DIM
    assert loaded.config.text_config.eos_token_id == TINY_CLIP_TEXT["eos_token_id"]
    with torch.no_grad():
        theirs = loaded(input_ids=torch.from_numpy(case["ids"]).long(),
                        pixel_values=torch.from_numpy(case["pixels"]).permute(0, 3, 1, 2))
    assert max_abs_diff(case["logits_per_image"], theirs.logits_per_image) <= ATOL
    assert CLIPModelConfig.from_dict(loaded.config.to_dict()) == config


def test_config_rejects_other_model_types():
    with pytest.raises(UnsupportedArchitectureError, match="model_type='siglip'"):
        CLIPModelConfig.from_dict(dict(TINY_CLIP, model_type="siglip"))
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act='relu'"):
        CLIPModelConfig.from_dict(dict(TINY_CLIP,
                                       text_config=dict(TINY_CLIP_TEXT, hidden_act="relu")))
    assert CLIPModelConfig.from_dict(TINY_CLIP).text == CLIPTextConfig.from_dict(TINY_CLIP_TEXT)
