"""CLIP text and vision towers: parity with transformers' PyTorch CLIP, weight layouts,
config round trips, and full-size shapes against the real architectures."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from safetensors.numpy import save_file

from spacetime_jax.models import convert
from spacetime_jax.models.clip_text import (CLIPTextConfig, CLIPTextTransformer,
                                            clip_text_param_template, eos_positions,
                                            load_clip_text_params)
from spacetime_jax.models.clip_vision import (CLIP_MEAN, CLIP_STD, CLIPVisionConfig,
                                              CLIPVisionTransformer, clip_preprocess,
                                              clip_vision_param_template,
                                              load_clip_vision_params)
from spacetime_jax.models.config_utils import UnsupportedArchitectureError
from spacetime_jax.models.tiny_configs import (TINY_CLIP_TEXT, TINY_CLIP_TEXT_SD2,
                                               TINY_CLIP_VISION)
from tests.torch_reference import randomize_, state_dict_numpy

ATOL = 1e-4
SEQ_LEN = 77


def max_abs_diff(ours, theirs) -> float:
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))))


def prompt_ids(config: dict, lengths=(5, 11), seed: int = 0) -> np.ndarray:
    """SD-style rows: BOS, random words, EOS, then EOS padding to SEQ_LEN."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        words = rng.integers(2, config["vocab_size"] - 2, size=n)
        row = [config["bos_token_id"], *words, config["eos_token_id"]]
        rows.append(row + [config["eos_token_id"]] * (SEQ_LEN - len(row)))
    return np.asarray(rows, np.int32)


def torch_text_model(config: dict, seed: int) -> transformers.CLIPTextModel:
    torch.manual_seed(seed)
    return randomize_(transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)), seed)


def torch_vision_model(config: dict, seed: int) -> transformers.CLIPVisionModel:
    torch.manual_seed(seed)
    return randomize_(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**config)),
                      seed)


class TextCase:
    """A torch CLIPTextModel with random weights and our twin loaded from its state dict."""

    def __init__(self, config: dict, seed: int):
        self.config_dict = config
        self.torch_model = torch_text_model(config, seed)
        self.config = CLIPTextConfig.from_dict(config)
        self.model = CLIPTextTransformer(self.config)
        self.state_dict = state_dict_numpy(self.torch_model)
        self.params = load_clip_text_params(self.state_dict, self.config)
        model = self.model
        # jit once per input kind (ids, embeddings, or both); eager flax is slow on 2 cores.
        self.apply = jax.jit(lambda p, ids=None, embeds=None: model.apply(
            {"params": p}, ids, inputs_embeds=embeds, output_hidden_states=True))
        self.embed = jax.jit(lambda p, ids: model.apply({"params": p}, ids,
                                                        method=model.embed_tokens))

    def torch_outputs(self, ids: np.ndarray):
        with torch.no_grad():
            return self.torch_model(torch.from_numpy(ids).long(), output_hidden_states=True)


@pytest.fixture(scope="module", params=["sd1_quick_gelu", "sd2_gelu"])
def text_case(request) -> TextCase:
    config = {"sd1_quick_gelu": TINY_CLIP_TEXT, "sd2_gelu": TINY_CLIP_TEXT_SD2}[request.param]
    return TextCase(config, seed=1)


@pytest.fixture(scope="module")
def vision_case():
    torch_model = torch_vision_model(TINY_CLIP_VISION, seed=2)
    config = CLIPVisionConfig.from_dict(TINY_CLIP_VISION)
    model = CLIPVisionTransformer(config)
    state_dict = state_dict_numpy(torch_model)
    params = load_clip_vision_params(state_dict, config)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, output_hidden_states=True))
    pixels = np.random.default_rng(3).standard_normal(
        (2, config.image_size, config.image_size, 3)).astype(np.float32)
    return dict(torch_model=torch_model, config=config, model=model, state_dict=state_dict,
                params=params, apply=apply, pixels=pixels)


# ---------------------------------------------------------------------------------------
# Text: parity


def test_text_matches_transformers_every_hidden_state(text_case):
    ids = prompt_ids(text_case.config_dict)
    ours = text_case.apply(text_case.params, ids)
    theirs = text_case.torch_outputs(ids)

    # Reached (fp32, CPU): <= 1.5e-6 on every output, both activations (|values| up to ~3.6).
    assert max_abs_diff(ours.last_hidden_state, theirs.last_hidden_state) <= ATOL
    assert max_abs_diff(ours.pooled_output, theirs.pooler_output) <= ATOL
    assert len(ours.hidden_states) == len(theirs.hidden_states) == \
        text_case.config.num_hidden_layers + 1
    for index, (h_ours, h_theirs) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert max_abs_diff(h_ours, h_theirs) <= ATOL, f"hidden state {index}"
    # transformers' last hidden state in the tuple is the one before the final LayerNorm.
    assert max_abs_diff(ours.last_hidden_state_pre_norm, theirs.hidden_states[-1]) <= ATOL


def test_text_pools_first_eos_not_padding(text_case):
    ids = prompt_ids(text_case.config_dict, lengths=(3, 20))
    ours = text_case.apply(text_case.params, ids)
    first_eos = np.array([4, 21])
    np.testing.assert_array_equal(eos_positions(ids, text_case.config.eos_token_id), first_eos)
    np.testing.assert_allclose(ours.pooled_output,
                               np.asarray(ours.last_hidden_state)[[0, 1], first_eos], atol=0)


def test_text_legacy_eos_2_pools_largest_token_like_transformers():
    # SD 1.x's text_encoder/config.json says eos_token_id=2: transformers then pools at the
    # largest token id. Row 0 has a token 2 before the largest id, so the two rules differ.
    legacy = dict(TINY_CLIP_TEXT, bos_token_id=0, eos_token_id=2)
    case = TextCase(legacy, seed=4)
    ids = prompt_ids(TINY_CLIP_TEXT, lengths=(6, 9))
    ids[0, 2] = 2
    np.testing.assert_array_equal(eos_positions(ids, 2), [7, 10])  # not 2, where token 2 is
    ours = case.apply(case.params, ids)
    theirs = case.torch_outputs(ids)
    assert max_abs_diff(ours.pooled_output, theirs.pooler_output) <= ATOL  # reached 7.7e-7


# ---------------------------------------------------------------------------------------
# Text: the pieces NeTI and ELITE call


def test_text_inputs_embeds_path_equals_ids_path(text_case):
    params = text_case.params
    ids = prompt_ids(text_case.config_dict)
    by_ids = text_case.apply(params, ids)
    embeds = text_case.embed(params, ids)
    by_embeds = text_case.apply(params, ids, embeds)
    for h_embeds, h_ids in zip(by_embeds.hidden_states, by_ids.hidden_states):
        assert max_abs_diff(h_embeds, h_ids) <= 1e-6
    assert max_abs_diff(by_embeds.last_hidden_state, by_ids.last_hidden_state) <= 1e-6
    assert max_abs_diff(by_embeds.pooled_output, by_ids.pooled_output) <= 1e-6
    # Without ids there is no EOS to pool at (traced only: no need to compile it).
    embeds_only = jax.eval_shape(lambda e: text_case.model.apply({"params": params},
                                                                 inputs_embeds=e), embeds)
    assert embeds_only.pooled_output is None
    assert embeds_only.last_hidden_state.shape == by_ids.last_hidden_state.shape


def test_text_edited_embedding_equals_swapped_token(text_case):
    # Writing token 7's embedding at position 2 is the same as prompting with token 7 there.
    params = text_case.params
    ids = prompt_ids(text_case.config_dict)
    swapped_ids = ids.copy()
    swapped_ids[:, 2] = 7
    word = text_case.embed(params, swapped_ids)[:, 2]
    edited = text_case.apply(params, ids, text_case.embed(params, ids).at[:, 2].set(word))
    swapped = text_case.apply(params, swapped_ids)
    assert max_abs_diff(edited.last_hidden_state, swapped.last_hidden_state) <= 1e-6
    original = text_case.apply(params, ids)
    assert max_abs_diff(edited.last_hidden_state, original.last_hidden_state) > 1e-2


def test_text_final_norm_of_pre_norm_is_last_hidden_state(text_case):
    # NeTI's textual bypass: residual added before the final LayerNorm, then final_norm.
    model, params = text_case.model, text_case.params
    out = text_case.apply(params, prompt_ids(text_case.config_dict))
    normed = model.apply({"params": params}, out.last_hidden_state_pre_norm,
                         method=model.final_norm)
    assert max_abs_diff(normed, out.last_hidden_state) <= 1e-6  # eager vs jit rounding only


def test_text_bfloat16_compute_stays_close_to_float32(text_case):
    model = CLIPTextTransformer(text_case.config, dtype=jnp.bfloat16)
    ids = prompt_ids(text_case.config_dict)
    half = jax.jit(lambda p, i: model.apply({"params": p}, i))(text_case.params, ids)
    full = text_case.apply(text_case.params, ids)
    assert half.last_hidden_state.dtype == jnp.bfloat16
    # bfloat16 keeps ~3 significant digits; reached ~0.03 on values up to ~3.6.
    assert max_abs_diff(half.last_hidden_state.astype(jnp.float32), full.last_hidden_state) < 0.1


# ---------------------------------------------------------------------------------------
# Text: weight layouts and round trips


def test_text_prefixed_and_flat_layouts_load_the_same(text_case):
    flat = text_case.state_dict  # transformers 5 saves without `text_model.`
    assert not any(k.startswith("text_model.") for k in flat)
    prefixed = {f"text_model.{k}": v for k, v in flat.items()}  # SD checkpoints
    from_prefixed = load_clip_text_params(prefixed, text_case.config)
    for a, b in zip(jax.tree.leaves(from_prefixed), jax.tree.leaves(text_case.params)):
        np.testing.assert_array_equal(a, b)


def test_text_mismatched_weights_are_named(text_case):
    broken = dict(text_case.state_dict)
    del broken["encoder.layers.1.mlp.fc2.bias"]
    broken["text_projection.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(convert.WeightMismatchError, match=r"(?s)missing: encoder\.layers\.1\."
                       r"mlp\.fc2\.bias.*unexpected: text_projection\.weight"):
        load_clip_text_params(broken, text_case.config)


def test_text_params_load_strictly_into_transformers(text_case):
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_case.config_dict))
    tensors = {k: torch.from_numpy(v)
               for k, v in convert.flax_to_torch(text_case.params).items()}
    model.load_state_dict(tensors, strict=True)
    for key, value in text_case.torch_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_text_saved_prefixed_folder_loads_in_transformers(text_case, tmp_path):
    # What we write: config.json from to_dict() + classic `text_model.`-prefixed weights.
    save_file(convert.flax_to_torch(text_case.params, prefix="text_model."),
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(text_case.config.to_dict()))
    loaded = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = prompt_ids(text_case.config_dict)
    with torch.no_grad():
        theirs = loaded(torch.from_numpy(ids).long())
    ours = text_case.apply(text_case.params, ids)
    assert max_abs_diff(ours.last_hidden_state, theirs.last_hidden_state) <= ATOL
    assert CLIPTextConfig.from_dict(loaded.config.to_dict()) == text_case.config


def test_text_config_round_trips_and_rejects_what_we_lack():
    config = CLIPTextConfig.from_dict(TINY_CLIP_TEXT_SD2)
    assert config.hidden_act == "gelu" and config.hidden_size == 48
    assert CLIPTextConfig.from_dict(config.to_dict()) == config
    theirs = transformers.CLIPTextConfig(**config.to_dict())
    assert (theirs.hidden_act, theirs.eos_token_id, theirs.num_hidden_layers) == ("gelu", 999, 3)
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act='relu'"):
        CLIPTextConfig.from_dict(dict(TINY_CLIP_TEXT, hidden_act="relu"))
    with pytest.raises(UnsupportedArchitectureError, match="model_type='clip'"):
        CLIPTextConfig.from_dict(dict(TINY_CLIP_TEXT, model_type="clip"))
    with pytest.raises(UnsupportedArchitectureError, match="num_attention_heads"):
        CLIPTextConfig.from_dict(dict(TINY_CLIP_TEXT, num_attention_heads=5))


# ---------------------------------------------------------------------------------------
# Vision


def test_vision_matches_transformers_every_hidden_state(vision_case):
    pixels = vision_case["pixels"]
    ours = vision_case["apply"](vision_case["params"], pixels)
    with torch.no_grad():
        theirs = vision_case["torch_model"](torch.from_numpy(pixels).permute(0, 3, 1, 2),
                                            output_hidden_states=True)
    # Reached (fp32, CPU): 9.6e-7 on every output.
    assert max_abs_diff(ours.last_hidden_state, theirs.last_hidden_state) <= ATOL
    assert max_abs_diff(ours.pooler_output, theirs.pooler_output) <= ATOL
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
    for index, (h_ours, h_theirs) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert max_abs_diff(h_ours, h_theirs) <= ATOL, f"hidden state {index}"


def test_vision_layouts_and_round_trip(vision_case, tmp_path):
    flat = vision_case["state_dict"]
    prefixed = {f"vision_model.{k}": v for k, v in flat.items()}
    from_prefixed = load_clip_vision_params(prefixed, vision_case["config"])
    for a, b in zip(jax.tree.leaves(from_prefixed), jax.tree.leaves(vision_case["params"])):
        np.testing.assert_array_equal(a, b)
    assert vision_case["params"]["embeddings"]["class_embedding"].shape == (32,)

    save_file(convert.flax_to_torch(vision_case["params"], prefix="vision_model."),
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(vision_case["config"].to_dict()))
    loaded = transformers.CLIPVisionModel.from_pretrained(tmp_path)
    for key, value in vision_case["torch_model"].state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert CLIPVisionConfig.from_dict(loaded.config.to_dict()) == vision_case["config"]


def test_vision_rejects_wrong_image_size(vision_case):
    with pytest.raises(ValueError, match="not the model's 32x32"):
        vision_case["model"].apply({"params": vision_case["params"]}, np.zeros((1, 40, 40, 3)))


def test_clip_preprocess_normalizes_with_clip_constants():
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    # An image already at the target size is only normalized.
    image = np.random.default_rng(5).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    out = clip_preprocess(jnp.asarray(image), 16)
    np.testing.assert_allclose(out, (image / 255.0 - mean) / std, atol=1e-5)
    # Non-square: shorter side resized, center-cropped; a flat image stays flat.
    flat = np.full((30, 45, 3), 0.25, np.float32)
    out = clip_preprocess(jnp.asarray(flat), 20)
    assert out.shape == (20, 20, 3)
    np.testing.assert_allclose(out, np.broadcast_to((0.25 - mean) / std, (20, 20, 3)),
                               atol=1e-5)


def test_clip_preprocess_center_crops_the_long_side():
    # Left third black, middle white, right third black: the center crop is all white.
    image = np.zeros((24, 72, 3), np.float32)
    image[:, 24:48] = 1.0
    out = clip_preprocess(jnp.asarray(image), 24)
    np.testing.assert_allclose(out, np.broadcast_to((1.0 - np.array(CLIP_MEAN)) /
                                                    np.array(CLIP_STD), (24, 24, 3)), atol=1e-5)


# ---------------------------------------------------------------------------------------
# Full-size architectures, shapes only (torch meta device vs jax.eval_shape)

SD1_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
                projection_dim=768, bos_token_id=0, eos_token_id=2)
SD2_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu",
                projection_dim=512)
VIT_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, image_size=224, patch_size=14,
                      projection_dim=768)


def assert_shapes_match(torch_model: torch.nn.Module, template, prefix: str,
                        param_count: int) -> None:
    """Every PyTorch weight maps to one distinct Flax param of the same shape and no Flax
    param is left without one (torch_shapes_to_flax raises on leftovers either way); the
    total is the published size of the real checkpoint's tower."""
    torch_shapes = {prefix + k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    mapped = convert.torch_shapes_to_flax(torch_shapes, template, strip_prefix=prefix)
    ours = {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(template).items()}
    assert len(mapped) == len(torch_shapes)  # one Flax param per PyTorch weight
    assert mapped == ours
    assert sum(int(np.prod(shape)) for shape in ours.values()) == param_count


@pytest.mark.parametrize("config, param_count", [(SD1_TEXT, 123_060_480),
                                                  (SD2_TEXT, 340_387_840)],
                         ids=["sd1_vit_l14", "sd2_vit_h14"])
def test_full_size_text_shapes_match_transformers(config, param_count):
    with torch.device("meta"):
        torch_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    template = clip_text_param_template(CLIPTextConfig.from_dict(config))
    assert_shapes_match(torch_model, template, "text_model.", param_count)


def test_full_size_vision_shapes_match_transformers():
    with torch.device("meta"):
        torch_model = transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(**VIT_L14_VISION))
    template = clip_vision_param_template(CLIPVisionConfig.from_dict(VIT_L14_VISION))
    assert template["embeddings"]["patch_embedding"]["kernel"].shape == (14, 14, 3, 1024)
    assert template["embeddings"]["position_embedding"]["embedding"].shape == (257, 1024)
    assert_shapes_match(torch_model, template, "vision_model.", 303_179_776)
