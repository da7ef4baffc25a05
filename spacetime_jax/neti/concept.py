"""A learned NeTI concept: what it is, how it enters the tokenizer, and its artifact on disk.

The artifact is a folder: `mapper.safetensors` (the mapper's params and its fixed Fourier
matrix W, flattened as "params/..." and "encoding/W") and `concept.json` (mapper settings,
tokens, target norm, base model, the training config). A few MB; the sampler loads it.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from flax import traverse_util

from spacetime_jax.errors import UserError
from spacetime_jax.models.clip_text import CLIPTextTransformer
from spacetime_jax.models.tokenizer import (add_placeholder_tokens, resize_token_embedding,
                                            single_token_id)
from spacetime_jax.neti.mapper import MapperConfig, build_mapper
from spacetime_jax.paths import as_path, write_atomic

ARTIFACT_VERSION = 1


@dataclasses.dataclass
class Concept:
    """One concept's mapper and the facts needed to use it."""
    kind: str                      # "neti" | "textual_inversion"
    mapper_config: MapperConfig
    variables: Any                 # {"params": ..., "encoding": {"W": ...}}
    placeholder: str
    super_category: str
    target_norm: float
    base_model: str
    learnable_property: str = "object"
    train_config: Optional[dict] = None

    @property
    def mapper(self):
        """The module, one per (kind, config) for all concepts: jitted samplers are keyed on
        it, so concepts of the same kind and shape share one compile."""
        return sampling_mapper(self.kind, self.mapper_config)


@functools.lru_cache(maxsize=None)
def sampling_mapper(kind: str, mapper_config: MapperConfig):
    """A mapper module for applying existing params. The baseline's initializer is irrelevant
    once its params exist; a fresh closure per concept would give each its own jit key."""
    init = np.zeros(mapper_config.token_dim, np.float32)
    return build_mapper(kind, mapper_config, init_embedding=init)


@dataclasses.dataclass
class PreparedText:
    """The frozen text encoder, its params and a tokenizer that know the placeholders."""
    text_encoder: CLIPTextTransformer
    text_params: Any
    tokenizer: Any
    placeholder_ids: list[int]
    target_norms: list[float]


def prepare_text_encoder(text_encoder: CLIPTextTransformer, tokenizer, text_params: Any,
                         placeholders: list[str], super_categories: list[str]) -> PreparedText:
    """Adds the placeholders to a COPY of the tokenizer and grows the token embedding.

    Each placeholder's embedding row starts as its super-category's (the mapper output
    replaces it at every use); target_norm is the norm of the super-category's embedding.
    """
    tokenizer = copy.deepcopy(tokenizer)
    super_ids = [single_token_id(tokenizer, word) for word in super_categories]
    placeholder_ids = add_placeholder_tokens(tokenizer, placeholders)
    embedding = np.asarray(text_params["embeddings"]["token_embedding"]["embedding"])
    old_rows, width = embedding.shape
    rows = max(old_rows, max(placeholder_ids) + 1)
    init = np.zeros((rows - old_rows, width), embedding.dtype)
    for pid, sid in zip(placeholder_ids, super_ids):
        if pid >= old_rows:
            init[pid - old_rows] = embedding[sid]
    grown = resize_token_embedding(embedding, rows, init) if rows > old_rows else embedding
    text_params = dict(text_params, embeddings=dict(
        text_params["embeddings"], token_embedding={"embedding": jnp.asarray(grown)}))
    config = dataclasses.replace(text_encoder.config, vocab_size=rows)
    return PreparedText(
        text_encoder=CLIPTextTransformer(config, dtype=text_encoder.dtype),
        text_params=text_params, tokenizer=tokenizer, placeholder_ids=placeholder_ids,
        target_norms=[float(np.linalg.norm(embedding[sid])) for sid in super_ids])


def save_concept(folder: str | os.PathLike, concept: Concept) -> epath.Path:
    """Writes the artifact folder (local or gs://); each file appears whole or not at all."""
    folder = as_path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(concept.variables), sep="/")
    # Contiguous: safetensors writes an array's buffer as is, and a transposed view (an
    # imported PyTorch kernel) would be saved untransposed.
    write_atomic(folder / "mapper.safetensors", safetensors.numpy.save(
        {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}))
    meta = {
        "version": ARTIFACT_VERSION,
        "kind": concept.kind,
        "mapper_config": concept.mapper_config.to_dict(),
        "placeholder": concept.placeholder,
        "super_category": concept.super_category,
        "target_norm": concept.target_norm,
        "base_model": concept.base_model,
        "learnable_property": concept.learnable_property,
        "train_config": concept.train_config,
    }
    write_atomic(folder / "concept.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def load_concept(folder: str | os.PathLike) -> Concept:
    folder = as_path(folder)
    meta_path, weights_path = folder / "concept.json", folder / "mapper.safetensors"
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise UserError(f"{folder} is not a NeTI concept: {path.name} is missing "
                            "(a training run writes it to WORKDIR/concept)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_path} is not valid JSON ({err})") from err
    if meta.get("version") != ARTIFACT_VERSION:
        raise UserError(f"{folder}: concept artifact version {meta.get('version')!r} is not "
                        f"supported (expected {ARTIFACT_VERSION})")
    variables = traverse_util.unflatten_dict(
        safetensors.numpy.load(weights_path.read_bytes()), sep="/")
    return Concept(kind=meta["kind"], mapper_config=MapperConfig.from_dict(meta["mapper_config"]),
                   variables=variables, placeholder=meta["placeholder"],
                   super_category=meta["super_category"], target_norm=meta["target_norm"],
                   base_model=meta["base_model"],
                   learnable_property=meta.get("learnable_property", "object"),
                   train_config=meta.get("train_config"))
