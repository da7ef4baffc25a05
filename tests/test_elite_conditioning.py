"""ELITE's conditioning: replace-and-shift word injection, the K/V copies merged over the
frozen U-Net, and the local branch (lambda 0, batch independence, the formula against PyTorch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spacetime_jax.elite.conditioning import (format_prompts, inject_words, injected_ids,
                                              local_contexts, prepare_text, word_selection)
from spacetime_jax.elite.params import cross_attention_kv, local_kv_init, merge_params
from spacetime_jax.errors import UserError
from spacetime_jax.models.attention import CrossAttention, LayerContexts, LocalBranch
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import load_stable_diffusion

TOKENS, LOCAL_TOKENS, WIDTH = 7, 5, 32


# --- Word injection.

def test_inject_words_replaces_the_placeholder_and_shifts_the_rest():
    length, width, words = 12, 3, 4
    embeds = np.arange(2 * length * width, dtype=np.float32).reshape(2, length, width)
    word_rows = -1.0 - np.arange(2 * words * width, dtype=np.float32).reshape(2, words, width)
    positions = np.array([3, 9])
    out = np.asarray(inject_words(jnp.asarray(embeds), jnp.asarray(positions),
                                  jnp.asarray(word_rows)))
    # Row 0: tokens 0..2 kept, words at 3..6, tokens 4.. at 7.. (shifted by words - 1 = 3).
    np.testing.assert_array_equal(out[0, :3], embeds[0, :3])
    np.testing.assert_array_equal(out[0, 3:7], word_rows[0])
    np.testing.assert_array_equal(out[0, 7:], embeds[0, 4:4 + length - 7])
    # Row 1: the words run past the end and are cut at the sequence length.
    np.testing.assert_array_equal(out[1, :9], embeds[1, :9])
    np.testing.assert_array_equal(out[1, 9:], word_rows[1, :3])
    ids = np.asarray(injected_ids(jnp.arange(length)[None].repeat(2, 0), jnp.asarray(positions),
                                  words, -1))
    np.testing.assert_array_equal(ids[0], [0, 1, 2, -1, -1, -1, -1, 4, 5, 6, 7, 8])


@pytest.fixture(scope="module")
def toy_text():
    sd = load_stable_diffusion(resolve_builtin("builtin:toyworld"))
    return sd, prepare_text(sd.text_encoder, sd.tokenizer, sd.text_params, "S")


def test_placeholder_is_found_by_token_id_in_a_close_up_photo(toy_text):
    _, text = toy_text
    # The reference splits the prompt on spaces; "close-up" makes that point one token early.
    (prompt,) = format_prompts(["a close-up photo of a {}"], "S")
    ids, position = text.encode_prompt(prompt)
    assert ids[position] == text.placeholder_id
    assert list(ids).count(text.placeholder_id) == 1
    words = prompt.split(" ")
    naive = words.index("S") + 1  # the reference's position (bos first)
    assert naive != position
    shifted = np.asarray(injected_ids(jnp.asarray(ids[None]), jnp.asarray([position]), 5, -1))[0]
    np.testing.assert_array_equal(shifted[:position], ids[:position])
    np.testing.assert_array_equal(shifted[position:position + 5], [-1] * 5)
    np.testing.assert_array_equal(shifted[position + 5:], ids[position + 1:77 - 4])


def test_new_placeholder_strings_become_one_token(toy_text):
    sd, _ = toy_text
    text = prepare_text(sd.text_encoder, sd.tokenizer, sd.text_params, "<object>")
    ids, position = text.encode_prompt("a photo of a <object> on a green background")
    assert ids[position] == text.placeholder_id >= len(sd.tokenizer)
    rows = text.text_params["embeddings"]["token_embedding"]["embedding"].shape[0]
    assert rows == text.placeholder_id + 1


def test_bad_prompts_and_token_indices_are_named():
    with pytest.raises(UserError, match="exactly once"):
        format_prompts(["a photo of a dog"], "S")
    with pytest.raises(UserError, match="token_index 5"):
        word_selection(jnp.zeros((1, 5, 4)), 5)
    assert word_selection(jnp.zeros((1, 5, 4)), None).shape == (1, 5, 4)
    assert word_selection(jnp.zeros((1, 5, 4)), 0).shape == (1, 1, 4)


# --- The U-Net's K/V copies and its local branch.

class LocalUNet:
    """The shipped toy-world U-Net (SD 1.x topology, 16 cross-attention layers) built with the
    local branch, its local projections perturbed away from to_k/to_v; loading it costs no
    init compile."""

    def __init__(self):
        sd = load_stable_diffusion(resolve_builtin("builtin:toyworld"), local_branch=True)
        self.model = sd.unet
        width = sd.unet.config.cross_attention_dim
        rng = np.random.RandomState(0)
        self.latents = rng.randn(2, 8, 8, 4).astype(np.float32)
        self.timesteps = np.array([10, 700], np.int32)
        self.context = rng.randn(2, TOKENS, width).astype(np.float32)
        self.tokens = rng.randn(2, LOCAL_TOKENS, width).astype(np.float32)
        # Distinct local projections (the method starts them as copies of to_k/to_v).
        local = jax.tree.map(lambda x: x + 0.3 * rng.randn(*x.shape).astype(np.float32),
                             local_kv_init(sd.unet_params))
        self.params = merge_params(sd.unet_params, local)
        self.apply = jax.jit(self.model.apply)

    def run(self, rows, scale, positions=(2, 3), local=True):
        rows = np.asarray(rows)
        if not local:
            return np.asarray(self.apply({"params": self.params}, self.latents[rows],
                                         self.timesteps[rows], self.context[rows]))
        contexts = local_contexts(jnp.asarray(self.context[rows]),
                                  jnp.asarray(self.tokens[rows]),
                                  jnp.asarray(np.asarray(positions)[rows]),
                                  jnp.asarray(scale, jnp.float32), 16)
        return np.asarray(self.apply({"params": self.params}, self.latents[rows],
                                     self.timesteps[rows], contexts))


@pytest.fixture(scope="module")
def unet():
    return LocalUNet()


def test_kv_copies_merge_over_the_frozen_unet_and_change_every_layer(unet):
    copies = cross_attention_kv(unet.params)
    assert len(jax.tree.leaves(copies)) == 32  # to_k and to_v of 16 layers
    same = merge_params(unet.params, copies)
    np.testing.assert_array_equal(unet.run([0, 1], [1.0, 1.0]),
                                  np.asarray(jax.jit(unet.model.apply)(
                                      {"params": same}, unet.latents, unet.timesteps,
                                      local_contexts(jnp.asarray(unet.context),
                                                     jnp.asarray(unet.tokens),
                                                     jnp.array([2, 3]), jnp.ones(2), 16))))
    changed = jax.tree.map(lambda x: x * 1.5, copies)
    out = unet.apply({"params": merge_params(unet.params, changed)}, unet.latents,
                     unet.timesteps, unet.context)
    assert np.abs(np.asarray(out) - unet.run([0, 1], None, local=False)).max() > 1e-3


def test_lambda_zero_equals_the_global_only_unet(unet):
    np.testing.assert_allclose(unet.run([0, 1], [0.0, 0.0]), unet.run([0, 1], None, local=False),
                               atol=1e-6)
    assert np.abs(unet.run([0, 1], [1.0, 1.0]) - unet.run([0, 1], None, local=False)).max() > 1e-3


def test_a_sample_is_the_same_alone_and_in_a_batch(unet):
    both = unet.run([0, 1], [0.6, 0.6])
    np.testing.assert_allclose(unet.run([0], [0.6]), both[:1], atol=2e-5)
    np.testing.assert_allclose(unet.run([1], [0.6]), both[1:], atol=2e-5)
    # The guidance batch: an unconditional row (lambda 0) beside a conditional one.
    guided = unet.run([0, 1], [0.0, 0.6])
    np.testing.assert_allclose(guided[1:], both[1:], atol=2e-5)
    np.testing.assert_allclose(guided[:1], unet.run([0], None, local=False), atol=2e-5)


def _reference_local_attention(x, context, tokens, params, heads, position, scale,
                               batch_wide_max=True):
    """METHODS.md's formula in PyTorch, as the reference computes it (one max over the batch,
    heads and queries)."""
    t = lambda a: torch.tensor(np.array(a, np.float32))
    kernel = lambda name: t(params[name]["kernel"])
    x, context, tokens = t(x), t(context), t(tokens)
    b, n, _ = x.shape
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, -1).permute(0, 2, 1, 3)
    q, k, v = split(x @ kernel("to_q")), split(context @ kernel("to_k")), split(
        context @ kernel("to_v"))
    kl, vl = split(tokens @ kernel("to_k_local")), split(tokens @ kernel("to_v_local"))
    s = q.shape[-1] ** -0.5
    attn = torch.softmax(q @ k.transpose(-1, -2) * s, dim=-1)
    out = attn @ v
    attn_local = torch.softmax(q @ kl.transpose(-1, -2) * s, dim=-1)
    m = attn[..., position]  # (b, heads, n)
    m = m / (m.max() if batch_wide_max else m.amax(dim=(1, 2), keepdim=True))
    out = out + scale * (attn_local * m[..., None]) @ vl
    out = out.permute(0, 2, 1, 3).reshape(b, n, -1)
    return (out @ kernel("to_out_0") + t(params["to_out_0"]["bias"])).numpy()


def test_local_attention_equals_a_pytorch_implementation_of_the_formula():
    heads, head_dim, queries, scale, position = 2, 8, 6, 0.7, 3
    rng = np.random.RandomState(3)
    x = rng.randn(2, queries, heads * head_dim).astype(np.float32)
    context = rng.randn(2, TOKENS, WIDTH).astype(np.float32)
    tokens = rng.randn(2, LOCAL_TOKENS, WIDTH).astype(np.float32)
    layer = CrossAttention(heads, head_dim, layer_index=0, local_branch=True)

    def contexts(rows):
        return LayerContexts(keys=jnp.asarray(context[None, rows]),
                             values=jnp.asarray(context[None, rows]),
                             local=LocalBranch(tokens=jnp.asarray(tokens[rows]),
                                               word_position=jnp.full((len(rows),), position),
                                               scale=jnp.full((len(rows),), scale)))

    params = layer.init(jax.random.key(0), x, contexts([0, 1]))["params"]
    ours, _ = layer.apply({"params": params}, x[:1], contexts([0]))
    reference = _reference_local_attention(x[:1], context[:1], tokens[:1], params, heads,
                                           position, scale)
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-5)
    # At batch 2 the reference's batch-wide max couples the samples; ours is per sample.
    ours_2, _ = layer.apply({"params": params}, x, contexts([0, 1]))
    per_sample = _reference_local_attention(x, context, tokens, params, heads, position, scale,
                                            batch_wide_max=False)
    np.testing.assert_allclose(np.asarray(ours_2), per_sample, atol=1e-5)
    batch_wide = _reference_local_attention(x, context, tokens, params, heads, position, scale)
    assert np.abs(batch_wide - per_sample).max() > 1e-4
