"""NeTI conditioning: the mapper's output into the text encoder, for every U-Net layer at once.

For a batch of B prompts (each holding the placeholder once) at timesteps t_b, the mapper is
evaluated at all (layer l, t_b) pairs, and the frozen text encoder runs ONCE over L x B rows
(layer-major: row = l * B + b). The token half of the mapper output replaces the placeholder's
input embedding; the textual bypass adds 0.2 x (bypass half rescaled to the hidden state's
norm) to the pre-final-LayerNorm hidden state at the placeholder. Keys come from the plain
context, values from the bypassed one (METHODS.md, "Into the text encoder").
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from spacetime_jax.models.attention import LayerContexts
from spacetime_jax.models.clip_text import CLIPTextTransformer

BYPASS_SCALE = 0.2


def layer_major_rows(timesteps: jax.Array, num_layers: int) -> tuple[jax.Array, jax.Array]:
    """(B,) timesteps -> the (L*B,) timesteps and layer indices of the mapper's rows."""
    batch = timesteps.shape[0]
    rows_t = jnp.tile(jnp.asarray(timesteps, jnp.float32), num_layers)
    rows_l = jnp.repeat(jnp.arange(num_layers, dtype=jnp.int32), batch)
    return rows_t, rows_l


def _rescale_to(vectors: jax.Array, reference: jax.Array) -> jax.Array:
    """Each row of `vectors` with the norm of the matching row of `reference`."""
    norm = lambda x: jnp.linalg.norm(x, axis=-1, keepdims=True)
    return vectors / norm(vectors) * norm(reference)


def neti_contexts(text_encoder: CLIPTextTransformer, text_params: Any, input_ids: jax.Array,
                  placeholder_positions: jax.Array, token_embeddings: jax.Array,
                  bypass_embeddings: Optional[jax.Array], num_layers: int) -> LayerContexts:
    """Key and value contexts of every layer: LayerContexts with (L, B, T, D) arrays.

    input_ids (B, T); placeholder_positions (B,); token_embeddings and bypass_embeddings
    (L*B, D), layer-major rows; bypass_embeddings None turns the bypass off (keys == values).
    """
    batch, length = input_ids.shape
    rows = num_layers * batch
    row_ids = jnp.tile(input_ids, (num_layers, 1))
    row_positions = jnp.tile(placeholder_positions, num_layers)
    row_index = jnp.arange(rows)

    embeds = text_encoder.apply({"params": text_params}, row_ids,
                                method=CLIPTextTransformer.embed_tokens)
    embeds = embeds.at[row_index, row_positions].set(token_embeddings.astype(embeds.dtype))
    out = text_encoder.apply({"params": text_params}, input_ids=row_ids, inputs_embeds=embeds)
    keys = out.last_hidden_state
    if bypass_embeddings is None:
        values = keys
    else:
        hidden = out.last_hidden_state_pre_norm[row_index, row_positions]
        bypassed = hidden + BYPASS_SCALE * _rescale_to(bypass_embeddings.astype(hidden.dtype),
                                                       hidden)
        bypassed = text_encoder.apply({"params": text_params}, bypassed,
                                      method=CLIPTextTransformer.final_norm)
        # Only the placeholder's position differs between keys and values.
        values = keys.at[row_index, row_positions].set(bypassed)
    shape = (num_layers, batch, length, keys.shape[-1])
    return LayerContexts(keys=keys.reshape(shape), values=values.reshape(shape))
