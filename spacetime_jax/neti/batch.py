"""Many concepts in one NeTI run: the concept set on disk, its validation, padding K to the
mesh, and stopping cleanly on SIGTERM.

A concept set (local or gs://) is a folder with one sub-folder of images per concept
(placeholder `<folder>`, the config's default super-category and learnable property), or a
manifest: a CSV file, or a `concepts.csv` inside the folder, with one concept per line

    folder, placeholder, super-category[, object|style]

(folders relative to the manifest, or gs:// URIs; `#` starts a comment; a first line starting
with `folder` is a header). Every concept is checked before anything is computed, and an error
names the concept it is about.

The step's concept axis K is padded up to a multiple of the mesh's `concept` axis (times the
step's passes over the concepts, train.concepts_per_pass) with copies of the last concept,
marked not `real`: they cost compute but never learn, report a loss or
reach a file. Checkpoints hold the K real rows only, so a run resumes on any mesh.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from spacetime_jax.data.images import load_concept_images
from spacetime_jax.errors import UserError
from spacetime_jax.models.tokenizer import single_token_id, super_category_words
from spacetime_jax.paths import as_path, is_remote

MANIFEST_NAME = "concepts.csv"
LEARNABLE_PROPERTIES = ("object", "style")


@dataclasses.dataclass(frozen=True)
class ConceptSpec:
    """One concept to learn, as the config names it."""
    name: str  # its folders' name: workdir/concepts/<name>, validation/step_N/<name>.png
    images: str
    placeholder: str
    super_category: str
    learnable_property: str = "object"


class ConceptError(UserError):
    """One or more concepts of a run cannot be used; the message names each."""


def concept_name(placeholder: str) -> str:
    """'<my cat>' -> 'my_cat': the placeholder as a folder name."""
    return re.sub(r"[^\w.-]+", "_", placeholder.strip("<>")).strip("._") or "concept"


def folder_placeholder(folder_name: str) -> str:
    """'my cat' -> '<my-cat>': a concept folder's name as its placeholder (one word, in
    angle brackets so that it is never a word of the vocabulary)."""
    return "<" + (re.sub(r"\s+", "-", folder_name.strip()) or "concept") + ">"


def read_concept_set(path: str | os.PathLike, super_category: str,
                     learnable_property: str = "object") -> list[ConceptSpec]:
    """The concepts of a folder of concept folders or of a manifest, local or gs:// (see the
    module doc); `super_category` and `learnable_property` are the sub-folders' defaults."""
    path = as_path(path)
    if not path.exists():
        raise UserError(f"data.concepts: {path} does not exist; give a folder with one "
                        f"sub-folder of images per concept, or a manifest ({MANIFEST_NAME})")
    if path.is_file():
        specs = _read_manifest(path)
    elif (path / MANIFEST_NAME).is_file():
        specs = _read_manifest(path / MANIFEST_NAME)
    else:
        folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise UserError(f"data.concepts: {path} holds no concept folders (one sub-folder "
                            f"of images per concept) and no {MANIFEST_NAME}")
        placeholders = [folder_placeholder(f.name) for f in folders]
        specs = [ConceptSpec(concept_name(placeholder), str(folder), placeholder, super_category,
                             learnable_property)
                 for folder, placeholder in zip(folders, placeholders)]
    check_specs(specs)
    return specs


def _read_manifest(path: epath.Path) -> list[ConceptSpec]:
    specs = []
    rows = csv.reader(io.StringIO(path.read_text(), newline=""))
    lines = [(number, [field.strip() for field in row])
             for number, row in enumerate(rows, start=1)]
    for number, fields in lines:
        if not any(fields) or fields[0].startswith("#"):
            continue
        if not specs and fields[0].lower() == "folder":
            continue  # the header
        where = f"{path}, line {number}"
        if len(fields) not in (3, 4) or not all(fields):
            raise UserError(f"{where}: expected 'folder, placeholder, super-category"
                            f"[, object|style]', got {','.join(fields)!r}")
        folder, placeholder, super_category = fields[:3]
        learnable_property = fields[3] if len(fields) == 4 else "object"
        images = folder if is_remote(folder) else str(path.parent / folder)
        specs.append(ConceptSpec(concept_name(placeholder), images, placeholder, super_category,
                                 learnable_property))
    if not specs:
        raise UserError(f"{path} lists no concepts")
    return specs


def _named(spec: ConceptSpec) -> str:
    return f"concept {spec.name!r} ({spec.images})"


def _raise_for(errors: list[str]) -> None:
    """One line for every bad concept, so that one run reports them all."""
    if errors:
        raise ConceptError("; ".join(errors))


def check_specs(specs: list[ConceptSpec]) -> None:
    """What needs neither images nor a tokenizer: learnable properties and unique
    placeholders (and names, the folders of the outputs)."""
    errors = [f"{_named(s)}: learnable property {s.learnable_property!r}: use 'object' or "
              "'style'" for s in specs if s.learnable_property not in LEARNABLE_PROPERTIES]
    same_placeholder = _duplicates(specs, "placeholder")
    # Names are placeholders made folder-safe: a repeated placeholder is one error, not two.
    errors += same_placeholder or _duplicates(specs, "name")
    _raise_for(errors)


def _duplicates(specs: list[ConceptSpec], field: str) -> list[str]:
    errors, first = [], {}
    for spec in specs:
        value = getattr(spec, field)
        other = first.setdefault(value, spec)
        if other is not spec:
            errors.append(f"{_named(spec)}: {field} {value!r} is also that of {_named(other)}; "
                          "give each concept its own")
    return errors


def check_images(specs: list[ConceptSpec], resolution: int) -> None:
    """Every concept's images decode (the loader's error, under the concept's name)."""
    errors = []
    for spec in specs:
        try:
            load_concept_images(spec.images, resolution)
        except UserError as error:
            errors.append(f"{_named(spec)}: {error}")
    _raise_for(errors)


def check_tokens(specs: list[ConceptSpec], tokenizer) -> None:
    """Each placeholder is a new word and each super-category exactly one token, as
    prepare_text_encoder needs them; checked here to name the concept. A missing or
    unusable super-category is offered the one-token nouns of this tokenizer."""
    vocab = tokenizer.get_vocab()
    nouns = super_category_words(tokenizer)
    errors = []
    for spec in specs:
        token = spec.placeholder
        if not token or any(c.isspace() for c in token):
            errors.append(f"{_named(spec)}: placeholder {token!r} must be one non-empty word "
                          "without spaces, such as '<my-cat>'")
        elif token in vocab or len(tokenizer.tokenize(token)) == 1:
            errors.append(f"{_named(spec)}: placeholder {token!r} is already a token of the "
                          f"vocabulary; choose a new string such as '<my-{token.strip('<>')}>'")
        if spec.super_category:
            try:
                single_token_id(tokenizer, spec.super_category, alternatives=nouns)
            except UserError as error:
                errors.append(f"{_named(spec)}: {error}")
    missing = [spec for spec in specs if not spec.super_category]
    if missing:  # one error for all: a batch's sub-folders share the config's default
        errors.append(
            f"{'; '.join(map(_named, missing))}: no super-category: say what "
            f"{', '.join(spec.placeholder for spec in missing)} "
            f"{'is' if len(missing) == 1 else 'are'} in one word of the model's vocabulary, "
            f"--config.concept.super_category=WORD (one-token nouns of this model: "
            f"{', '.join(nouns)})")
    _raise_for(errors)


# --- Padding K to the mesh's concept axis.

# train.concepts_per_pass = 0 on a CPU (benchmarks/batch_concepts.py, toy model, 2 cores):
# all at once, K = 4 and 8 trained 0.87x and 0.81x the concepts per hour of K = 1 (the
# working set outgrows the caches); in passes of 2, K = 2, 4 and 8 trained 1.02x, 1.09x and
# 1.00x. Accelerators want all of them at once.
CPU_CONCEPTS_PER_PASS = 2


def concepts_per_pass(value: int, backend: str) -> int:
    """train.concepts_per_pass resolved: concepts per device in one pass of the step's
    gradient computation; -1 all at once, 0 (auto) CPU_CONCEPTS_PER_PASS on a CPU and all
    at once elsewhere."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise UserError(f"train.concepts_per_pass={value!r}: it takes a whole number >= 1, "
                        f"0 (auto: {CPU_CONCEPTS_PER_PASS} per device on a CPU, all at once on "
                        "GPUs and TPUs) or -1 (all at once)")
    if value == 0:
        return CPU_CONCEPTS_PER_PASS if backend == "cpu" else -1
    return value


def concept_passes(num_concepts: int, mesh: jax.sharding.Mesh, per_pass: int) -> int:
    """Passes over the concepts in one step, each device taking at most `per_pass` of its
    own at a time (-1: one pass)."""
    per_device = -(-num_concepts // mesh.shape["concept"])
    if per_pass < 0 or per_pass >= per_device:
        return 1
    return -(-per_device // per_pass)


def padded_count(num_concepts: int, mesh: jax.sharding.Mesh, passes: int = 1) -> int:
    """K rounded up so that every device row gets as many, in `passes` equal passes."""
    per = mesh.shape["concept"] * passes
    return -(-num_concepts // per) * per


def pad_rows(tree: Any, count: int) -> Any:
    """Host arrays with leading axis K -> `count` rows, the last row repeated."""
    def pad(x):
        x = np.asarray(x)
        if x.shape[0] == count:
            return x
        return np.concatenate([x, np.repeat(x[-1:], count - x.shape[0], axis=0)])
    return jax.tree.map(pad, tree)


def real_rows(num_concepts: int, count: int) -> np.ndarray:
    """(count,) bool: True on the concepts, False on the padding."""
    return np.arange(count) < num_concepts


@functools.partial(jax.jit, static_argnums=(1, 2))
def _resize_leaves(leaves: tuple, count: int, shardings: tuple) -> list:
    def resize(x):
        if not x.ndim or x.shape[0] == count:
            return x
        if x.shape[0] > count:
            return x[:count]
        return jnp.concatenate([x, jnp.repeat(x[-1:], count - x.shape[0], axis=0)])
    return [jax.lax.with_sharding_constraint(resize(x), sharding)
            for x, sharding in zip(leaves, shardings)]


def resize_rows(state: Any, count: int, shardings: Any) -> Any:
    """Every leaf with a leading concept axis cut or padded (the last row repeated) to `count`
    rows, 0-d leaves as they are, placed as `shardings` say: the real rows of the padded state
    are what a checkpoint holds, and a restored checkpoint is padded again for the step."""
    leaves, treedef = jax.tree.flatten(state)
    resized = _resize_leaves(tuple(leaves), count, tuple(jax.tree.leaves(shardings)))
    return jax.tree.unflatten(treedef, resized)
