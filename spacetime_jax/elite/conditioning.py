"""ELITE's text side: the encoder's words replace the placeholder token in the prompt.

The placeholder is found by token id (the reference splits the prompt on spaces, which points
at the wrong token in "a close-up photo of a S"). The words take the placeholder's position and
the ones after it; the rest of the prompt shifts right and is cut at 77 tokens, as in the
reference. The placeholder may be an existing word ("S", the reference's) since its embedding
is never used; a new string is added to a copy of the tokenizer.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spacetime_jax.errors import UserError
from spacetime_jax.models.attention import LayerContexts, LocalBranch
from spacetime_jax.models.clip_text import CLIPTextTransformer
from spacetime_jax.models.tokenizer import (add_placeholder_tokens, check_prompt_length,
                                            find_token_positions, resize_token_embedding,
                                            tokenize)


@dataclasses.dataclass
class EliteText:
    """The text encoder and a tokenizer that know the placeholder as one token."""
    text_encoder: CLIPTextTransformer
    text_params: Any
    tokenizer: Any
    placeholder: str
    placeholder_id: int

    def encode_prompt(self, prompt: str) -> tuple[np.ndarray, int]:
        """One prompt holding the placeholder -> ((77,) ids, the placeholder's position)."""
        check_prompt_length(self.tokenizer, prompt)
        ids = tokenize(self.tokenizer, [prompt])
        return ids[0], int(find_token_positions(ids, self.placeholder_id, [prompt])[0])

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        for prompt in prompts:
            check_prompt_length(self.tokenizer, prompt)
        ids = tokenize(self.tokenizer, list(prompts))
        return ids, find_token_positions(ids, self.placeholder_id, list(prompts))


def prepare_text(text_encoder: CLIPTextTransformer, tokenizer, text_params: Any,
                 placeholder: str) -> EliteText:
    """`placeholder` as one token: an existing single-token word as is, else a new token (on a
    copy of the tokenizer, its embedding row zero: the words always replace it)."""
    if not placeholder or any(c.isspace() for c in placeholder):
        raise UserError(f"placeholder {placeholder!r} must be one word without spaces, such as "
                        "'S' (the reference's) or '<object>'")
    ids = tokenizer(placeholder, add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        return EliteText(text_encoder, text_params, tokenizer, placeholder, int(ids[0]))
    tokenizer = copy.deepcopy(tokenizer)
    (new_id,) = add_placeholder_tokens(tokenizer, [placeholder])
    embedding = np.asarray(text_params["embeddings"]["token_embedding"]["embedding"])
    rows = max(embedding.shape[0], new_id + 1)
    grown = resize_token_embedding(embedding, rows, np.zeros(embedding.shape[1],
                                                             embedding.dtype))
    text_params = dict(text_params, embeddings=dict(
        text_params["embeddings"], token_embedding={"embedding": jnp.asarray(grown)}))
    config = dataclasses.replace(text_encoder.config, vocab_size=rows)
    return EliteText(CLIPTextTransformer(config, dtype=text_encoder.dtype), text_params,
                     tokenizer, placeholder, new_id)


def format_prompts(prompts: Sequence[str], placeholder: str) -> list[str]:
    """"a photo of {}" -> "a photo of S"; a prompt without "{}" exactly once is an error."""
    out = []
    for prompt in prompts:
        if prompt.count("{}") != 1:
            raise UserError(f"prompt {prompt!r} must hold the object's slot '{{}}' exactly once "
                            "(e.g. 'a photo of {} on the beach')")
        out.append(prompt.replace("{}", placeholder))
    return out


def inject_words(token_embeds: jax.Array, positions: jax.Array, words: jax.Array) -> jax.Array:
    """Replace-and-shift: row b's placeholder at positions[b] becomes words[b] (W tokens);
    the tokens after it move W - 1 places right; the sequence keeps its length T.

    token_embeds (B, T, D), positions (B,), words (B, W, D) -> (B, T, D).
    """
    batch, length, _ = token_embeds.shape
    num_words = words.shape[1]
    index = jnp.arange(length)[None, :]
    start = positions[:, None]
    offset = index - start  # >= 0 from the placeholder on
    in_words = (offset >= 0) & (offset < num_words)
    source = jnp.where(offset < 0, index, index - (num_words - 1))
    shifted = jnp.take_along_axis(token_embeds, jnp.clip(source, 0, length - 1)[..., None],
                                  axis=1)
    word_rows = jnp.take_along_axis(words, jnp.clip(offset, 0, num_words - 1)[..., None],
                                    axis=1)
    return jnp.where(in_words[..., None], word_rows.astype(token_embeds.dtype), shifted)


def injected_ids(input_ids: jax.Array, positions: jax.Array, num_words: int,
                 fill_id: int) -> jax.Array:
    """The token ids in the same replace-and-shift layout (the words' slots hold `fill_id`):
    what inject_words does to the embeddings, done to the ids (tests, attention maps)."""
    length = input_ids.shape[1]
    index = jnp.arange(length)[None, :]
    offset = index - positions[:, None]
    source = jnp.where(offset < 0, index, index - (num_words - 1))
    shifted = jnp.take_along_axis(input_ids, jnp.clip(source, 0, length - 1), axis=1)
    return jnp.where((offset >= 0) & (offset < num_words), fill_id, shifted)


def encode_with_words(text_encoder: CLIPTextTransformer, text_params: Any,
                      input_ids: jax.Array, positions: jax.Array,
                      words: jax.Array) -> jax.Array:
    """The text encoder's output (B, 77, D) for prompts whose placeholder is replaced by
    `words` (B, W, D)."""
    embeds = text_encoder.apply({"params": text_params}, input_ids,
                                method=CLIPTextTransformer.embed_tokens)
    embeds = inject_words(embeds, positions, words)
    return text_encoder.apply({"params": text_params}, inputs_embeds=embeds).last_hidden_state


def local_contexts(hidden: jax.Array, local_tokens: jax.Array, word_position: jax.Array,
                   scale: jax.Array, num_layers: int) -> LayerContexts:
    """One context for every layer, plus the local branch: `local_tokens` (B, N, D) gated by
    the global attention map of the token at `word_position` (B,), times `scale` (B,)."""
    contexts = LayerContexts.shared(hidden, num_layers)
    return contexts.replace(local=LocalBranch(tokens=local_tokens,
                                              word_position=word_position.astype(jnp.int32),
                                              scale=jnp.asarray(scale, jnp.float32)))


def word_selection(words: jax.Array, token_index: Optional[int]) -> jax.Array:
    """All words (token_index None) or one of them, as (B, W', D)."""
    if token_index is None:
        return words
    if not 0 <= token_index < words.shape[1]:
        raise UserError(f"token_index {token_index} is outside 0..{words.shape[1] - 1} (the "
                        "encoder makes one primary word and auxiliary words; use 0 or all)")
    return words[:, token_index:token_index + 1]
