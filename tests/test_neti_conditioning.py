"""NeTI's batched 16-layer conditioning against a PyTorch NeTI text encoder (one call per layer)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig as TorchCLIPTextConfig
from transformers import CLIPTextModel
from transformers.masking_utils import create_causal_mask

from spacetime_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, load_clip_text_params
from spacetime_jax.models.tiny_configs import TINY_CLIP_TEXT
from spacetime_jax.neti.conditioning import BYPASS_SCALE, layer_major_rows, neti_contexts
from tests.torch_reference import randomize_, state_dict_numpy

LAYERS, BATCH, LENGTH = 16, 2, 12
PLACEHOLDER_ID = 997
POSITIONS = np.array([3, 7])


def torch_neti_text_encoder(model, input_ids, position, token_embedding, bypass):
    """The reference's structure for one layer: insert, encode, bypass, final LayerNorm."""
    text = getattr(model, "text_model", model)  # transformers 5 flattened the wrapper
    embeds = text.embeddings.token_embedding(input_ids).clone()
    rows = torch.arange(input_ids.shape[0])
    embeds[rows, position] = token_embedding
    hidden = text.embeddings(inputs_embeds=embeds)
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=None)
    hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
    keys = text.final_layer_norm(hidden)
    existing = hidden[rows, position]
    rescaled = bypass / bypass.norm(dim=1, keepdim=True) * existing.norm(dim=1, keepdim=True)
    bypassed = hidden.clone()
    bypassed[rows, position] = existing + BYPASS_SCALE * rescaled
    return keys, text.final_layer_norm(bypassed)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    reference = randomize_(CLIPTextModel(TorchCLIPTextConfig(**TINY_CLIP_TEXT)), seed=3, scale=0.1)
    config = CLIPTextConfig.from_dict(TINY_CLIP_TEXT)
    params = load_clip_text_params(state_dict_numpy(reference), config)
    rng = np.random.RandomState(0)
    input_ids = rng.randint(0, 900, (BATCH, LENGTH))
    input_ids[np.arange(BATCH), POSITIONS] = PLACEHOLDER_ID
    width = config.hidden_size
    token_embeddings = rng.randn(LAYERS * BATCH, width).astype(np.float32)
    bypass = rng.randn(LAYERS * BATCH, width).astype(np.float32)
    encoder = CLIPTextTransformer(config)
    contexts_fn = jax.jit(neti_contexts, static_argnums=(0, 6))
    contexts = contexts_fn(encoder, params, jnp.asarray(input_ids), jnp.asarray(POSITIONS),
                           token_embeddings, bypass, LAYERS)
    return dict(reference=reference, params=params, encoder=encoder, input_ids=input_ids,
                token_embeddings=token_embeddings, bypass=bypass, contexts=contexts,
                contexts_fn=contexts_fn)


def test_all_layer_contexts_match_the_pytorch_reference(setup):
    keys, values = np.asarray(setup["contexts"].keys), np.asarray(setup["contexts"].values)
    assert keys.shape == values.shape == (LAYERS, BATCH, LENGTH, 32)
    ids = torch.from_numpy(setup["input_ids"])
    for layer in range(LAYERS):
        rows = slice(layer * BATCH, (layer + 1) * BATCH)
        with torch.no_grad():
            ref_keys, ref_values = torch_neti_text_encoder(
                setup["reference"], ids, torch.from_numpy(POSITIONS),
                torch.from_numpy(setup["token_embeddings"][rows]),
                torch.from_numpy(setup["bypass"][rows]))
        # Reached: ~1e-6.
        np.testing.assert_allclose(keys[layer], ref_keys.numpy(), atol=1e-4)
        np.testing.assert_allclose(values[layer], ref_values.numpy(), atol=1e-4)


def test_row_of_the_batched_call_equals_the_single_layer_call(setup):
    layer = 11
    rows = slice(layer * BATCH, (layer + 1) * BATCH)
    single = setup["contexts_fn"](setup["encoder"], setup["params"], jnp.asarray(setup["input_ids"]),
                                  jnp.asarray(POSITIONS), setup["token_embeddings"][rows],
                                  setup["bypass"][rows], 1)
    np.testing.assert_allclose(np.asarray(single.keys[0]), np.asarray(setup["contexts"].keys[layer]),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(single.values[0]),
                               np.asarray(setup["contexts"].values[layer]), atol=1e-5)


def test_bypass_touches_only_the_values_at_the_placeholder(setup):
    plain = setup["contexts_fn"](setup["encoder"], setup["params"], jnp.asarray(setup["input_ids"]),
                                 jnp.asarray(POSITIONS), setup["token_embeddings"], None, LAYERS)
    np.testing.assert_array_equal(np.asarray(plain.keys), np.asarray(plain.values))
    np.testing.assert_allclose(np.asarray(plain.keys), np.asarray(setup["contexts"].keys), atol=1e-6)
    difference = np.abs(np.asarray(setup["contexts"].values) - np.asarray(setup["contexts"].keys))
    changed = difference.max(axis=-1) > 1e-6  # (L, B, T)
    expected = np.zeros_like(changed)
    expected[:, np.arange(BATCH), POSITIONS] = True
    np.testing.assert_array_equal(changed, expected)


def test_contexts_differ_across_layers_and_match_the_token_after_the_placeholder(setup):
    keys = np.asarray(setup["contexts"].keys)
    # Different mapper outputs per layer give different contexts from the placeholder on...
    assert np.abs(keys[0, :, POSITIONS.max():] - keys[5, :, POSITIONS.max():]).max() > 1e-3
    # ...and, with a causal mask, identical ones before it.
    np.testing.assert_allclose(keys[0, :, :3], keys[5, :, :3], atol=1e-6)


def test_layer_major_rows_pair_each_layer_with_each_timestep():
    t, l = layer_major_rows(jnp.array([5.0, 900.0]), 3)
    np.testing.assert_array_equal(np.asarray(t), [5, 900, 5, 900, 5, 900])
    np.testing.assert_array_equal(np.asarray(l), [0, 0, 1, 1, 2, 2])
