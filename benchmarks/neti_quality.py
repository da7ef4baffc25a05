"""NeTI quality on the toy world's held-out concepts: concept fidelity and prompt fidelity.

  nice -n 10 python benchmarks/neti_quality.py [--model builtin:toyworld] [--steps 100,250,500]
      [--out benchmarks/out/neti_quality] [--elite-global DIR] [--elite-local DIR] [--methods ...]

The held-out concepts of toyworld/concepts.py (a crescent, a blue-and-white striped arrow,
an orange bolt: shapes pretraining never drew; a red heart with white dots: a combination it
never drew) and its four benchmark-only concepts (a green house, a purple tee, a white
hourglass, a blue drop: shapes drawn nowhere else, reported apart, so that the table shows
whether results carry over) get 5 photos each (seed 0) and a placeholder <name>, initialized
from the nearest one-token world word (SUPER_CATEGORIES). Each method learns every concept
at once, in one Session (a leading concept axis, K = 4) with the `tiny`
config's settings (configs/neti.py: batch 2 x 2 accumulation, the same lr and seed), the same
step budget for every method:

  textual_inversion  the baseline: one learned embedding (mapper.kind=textual_inversion)
  neti_no_bypass     NeTI's space-time mapper without the textual bypass
  neti               NeTI (mapper and bypass); at the last milestone also sampled with the
                     nested-dropout truncation 8, 16, 32, 64, 128 (128 = hidden_width keeps
                     every dimension: that row is the untruncated one). It trains once per
                     --curve-seeds seed (train.seed; default 0, 1, 2): its rows are the means
                     over them, and the truncation curve is printed with each metric's spread
                     over seeds (mean +- standard deviation) and plotted with every seed's
                     curve

At each milestone every concept is sampled with fixed seeds (the same for every method and
milestone; 20 dpmpp_2m steps, guidance 4) from "a photo of a <name>" (plain) and from "a
photo of a <name> on a C background" for four background colors C that are none of the
concept's colors (edit). Scores, per image, averaged over the concept's images, then over the
concepts:

  clip      concept fidelity, the papers' image similarity computed with the world's own
            CLIP: mean cosine similarity between the pooled image embedding (post-LN CLS token
            of the shipped image_encoder) of the generated image and of each of the concept's
            5 photos; _plain and _edit columns. The embedding follows color and background
            more than outline (on the shipped CLIP, new renders of the crescent score only a
            little above the same scenes with a circle, the arrow's not above a triangle's),
            so an embedding that copies the photos' backgrounds can pass the renders' ceiling;
            read it beside shape and color.
  shape     concept fidelity from pixels (toyworld/fidelity.py): the best IoU between the
            generated object's silhouette and a photo's, both cut to their bounding square
            (position and size do not count). It separates the new shapes from their
            super-category (a circle scores ~0.4 against the crescent's photos), not the
            dotted heart from a plain one (same outline).
  color     concept fidelity from pixels, on all images: the measured object color
            (toyworld/measure.py) is the concept's main color (yellow, blue, orange, red).
  bg        prompt fidelity (edit images only): the measured background color is the
            prompted one. Chance is 1/8.

ELITE rows (for each encoder folder given; ELITE is a one-image method and trains nothing per
concept): the concept's photo 0 and its object mask (the render's) go through the encoder once;
the words (and local tokens) condition every prompt, with the ELITE placeholder in place of
<name> and the same seeds, sampler and measures:

  elite_global       --elite-global DIR: the global words, word 0 injected (token_index 0, as
                     the reference's scripts)
  elite_global_all   the same encoder, all five words injected (its inference script's
                     default; stage 1 trains with all five)
  elite_local_l0.6   --elite-local DIR (an encoder with both stages): word 0 + the local
  elite_local_l1.0   tokens at lambda 0.6 and 1.0

Their s/concept is one encoder pass of the photo (median of a few after compile); the
encoder's own training (stage 1 + 2, from the training workdirs' metrics.jsonl) is amortized
over every concept and printed beside the table. --methods names the NeTI methods to train;
`none` trains none, and `elite` (alone or in the list) asks for the ELITE rows, so
`--methods elite --elite-global A --elite-local B` scores the ELITE rows and the references only.

Reference rows use the same prompts and seeds with no learning: the super-category word in
place of the placeholder ("a photo of a circle"), and the concept in the world's words with
the super-category's shape ("a photo of a yellow circle", "a photo of a blue striped
triangle"); and fresh renders of the concept itself (seed 1; on the prompted backgrounds for
the edit rows), the ceiling. s/concept: training wall time to the milestone over the number
of concepts (compile apart; every concept of a run trains in the same steps).

Written under --out: fidelity_editability.png (x: bg, y: clip_edit, one labelled point per
truncation, the other methods and references as squares), photos.png (the training photos),
samples_<method>_step<N>.png (per concept: plain seeds, then one image per edit background),
samples_neti_step<N>_truncations.png, samples_<elite row>.png, results.json (every row, per concept and mean) and
photos/ (the photo files the runs read). Whatever comes out is reported; the world is not
tuned to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import format_table
from configs.neti import get_config
from benchmarks.common import median, time_fn
from configs import elite_global as elite_configs
from spacetime_jax.elite import sample as elite_sample
from spacetime_jax.elite.artifact import EncoderArtifact, load_encoder
from spacetime_jax.elite.conditioning import format_prompts as elite_prompts
from spacetime_jax.elite.personalize import encoder_folder
from spacetime_jax.errors import UserError
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.clip_vision import clip_preprocess
from spacetime_jax.models.pretrained import load_clip_vision, load_stable_diffusion
from spacetime_jax.models.tokenizer import single_token_id
from spacetime_jax.neti.concept import prepare_text_encoder
from spacetime_jax.neti.sample import format_prompts, generate
from spacetime_jax.neti.train import ConceptSpec, build_session, concepts_to_host
from spacetime_jax.parallel import sharding
from spacetime_jax.parallel.mesh import make_mesh
from spacetime_jax.pipelines.text_to_image import text_to_image
from spacetime_jax.plots import tradeoff_plot, write_png_bytes
from spacetime_jax.toyworld import fidelity
from spacetime_jax.toyworld.captions import background_phrase
from spacetime_jax.toyworld.concepts import (BENCHMARK_CONCEPTS, HELD_OUT_CONCEPTS,
                                             render_concept_images, write_concept_images)
from spacetime_jax.toyworld.measure import measure_background_color, measure_object_color
from spacetime_jax.toyworld.render import render
from spacetime_jax.training.progress import METRICS_FILE
from spacetime_jax.toyworld.scene import Background
from spacetime_jax.visualize import save_grid

REPO = Path(__file__).resolve().parents[1]
CONCEPTS = {**HELD_OUT_CONCEPTS, **BENCHMARK_CONCEPTS}
# The table's groups, each reported with its own means.
GROUPS = {"held-out": tuple(HELD_OUT_CONCEPTS), "benchmark-only": tuple(BENCHMARK_CONCEPTS)}
SUPER_CATEGORIES = {"crescent": "circle", "arrow": "triangle", "bolt": "star",
                    "polka_heart": "heart", "house": "square", "tee": "cross",
                    "hourglass": "triangle", "drop": "circle"}
# Config overrides of each method (on top of configs/neti.py:tiny).
METHODS = {"textual_inversion": {"mapper.kind": "textual_inversion"},
           "neti_no_bypass": {"mapper.use_bypass": False},
           "neti": {}}
TRUNCATIONS = (8, 16, 32, 64, 128)
NUM_PHOTOS = 5
# Edit backgrounds: the first four of these that are none of the concept's colors.
BACKGROUND_ORDER = ("green", "purple", "black", "white", "blue", "red", "orange", "yellow")
NUM_BACKGROUNDS = 4
SEED_OFFSET = 20_000  # away from the pretraining's and the other benchmarks' seeds
PLAIN_TEMPLATE = "a photo of a {}"
METRICS = ("clip_plain", "clip_edit", "shape_plain", "shape_edit", "color", "bg")
NO_METHODS, ELITE = "none", "elite"  # --methods words besides the NeTI methods
ELITE_PHOTO = 0           # ELITE encodes one image: the concept's first photo
ELITE_LAMBDAS = (0.6, 1.0)
ENCODE_TIMED_CALLS = 5


# ---------------------------------------------------------------------------------------
# What is asked of each concept.


@dataclasses.dataclass(frozen=True)
class Prompts:
    """One concept's evaluation rows: templates with the concept's slot '{}', the background
    each edit row asks for (None: plain), and each row's seed."""
    templates: tuple[str, ...]
    backgrounds: tuple[str | None, ...]
    seeds: tuple[int, ...]

    def filled(self, text: str) -> list[str]:
        return format_prompts(self.templates, text)


def edit_backgrounds(colors: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(c for c in BACKGROUND_ORDER if c not in colors)[:NUM_BACKGROUNDS]


def evaluation_prompts(concept, seeds_per_prompt: int) -> Prompts:
    """Plain rows first, then each edit background; every prompt with the same seeds."""
    seeds = tuple(SEED_OFFSET + i for i in range(seeds_per_prompt))
    templates, backgrounds = [], []
    for color in (None,) + edit_backgrounds(concept.colors):
        template = PLAIN_TEMPLATE if color is None else (
            f"{PLAIN_TEMPLATE} on {background_phrase(Background('plain', color))}")
        templates += [template] * seeds_per_prompt
        backgrounds += [color] * seeds_per_prompt
    return Prompts(tuple(templates), tuple(backgrounds), seeds * (1 + NUM_BACKGROUNDS))


def in_world_words(concept, super_category: str) -> str:
    """The concept as the world's captions could say it: main color, texture, the
    super-category's shape ("red dotted heart"; captions never write a two-tone "and")."""
    texture = [] if concept.texture == "plain" else [concept.texture]
    return " ".join([concept.color] + texture + [super_category])


def ceiling_renders(concept, prompts: Prompts, size: int) -> np.ndarray:
    """The concept itself, rendered: new photos (seed 1, not the training ones) for the plain
    rows, and new scenes of it on the prompted plain background for the edit rows."""
    num_plain = sum(b is None for b in prompts.backgrounds)
    images = render_concept_images(concept, num_plain, seed=1, size=size)
    rng = np.random.default_rng([1, num_plain])
    for color in prompts.backgrounds[num_plain:]:
        scene = dataclasses.replace(concept.scene(rng), background=Background("plain", color))
        images.append(render(scene, size)[0])
    return np.stack(images)


# ---------------------------------------------------------------------------------------
# Scores.


class ClipEmbedder:
    """Pooled image embeddings of the model's own CLIP vision tower, one compile per batch
    shape."""

    def __init__(self, model_dir: Path):
        folder = model_dir / "image_encoder"
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} is missing: the concept-fidelity score needs the "
                            "model's CLIP image encoder (builtin:toyworld ships it)")
        self.model, self.params = load_clip_vision(folder)
        size = self.model.config.image_size
        self._embed = jax.jit(lambda params, images: self.model.apply(
            {"params": params}, clip_preprocess(images, size)).pooler_output)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._embed(self.params, jnp.asarray(images)))


@dataclasses.dataclass
class Reference:
    """What a concept's generated images are compared with: its photos' embeddings and
    silhouettes, and its main color."""
    embeddings: np.ndarray
    silhouettes: list
    color: str


def score(images: np.ndarray, prompts: Prompts, reference: Reference,
          embed: ClipEmbedder) -> dict[str, float]:
    """The benchmark's measures (module docstring) of one concept's evaluation images."""
    plain = np.array([b is None for b in prompts.backgrounds])
    clip = fidelity.mean_cosine_similarity(embed(images), reference.embeddings)
    shape = np.array([fidelity.shape_similarity(im, reference.silhouettes) for im in images])
    color = np.array([measure_object_color(im) == reference.color for im in images])
    bg = np.array([measure_background_color(im) == b
                   for im, b in zip(images[~plain], np.asarray(prompts.backgrounds)[~plain])])
    return {"clip_plain": float(clip[plain].mean()), "clip_edit": float(clip[~plain].mean()),
            "shape_plain": float(shape[plain].mean()), "shape_edit": float(shape[~plain].mean()),
            "color": float(color.mean()), "bg": float(bg.mean())}


def mean_scores(per_concept: dict[str, dict[str, float]]) -> dict[str, float]:
    return {m: float(np.mean([s[m] for s in per_concept.values()])) for m in METRICS}


def concept_groups(names: list[str]) -> dict[str, list[str]]:
    """GROUPS restricted to `names` (in their order), empty groups left out."""
    groups = {group: [n for n in names if n in members] for group, members in GROUPS.items()}
    return {group: members for group, members in groups.items() if members}


def group_means(row: dict, members: list[str]) -> dict[str, float]:
    return mean_scores({n: row["per_concept"][n] for n in members})


# ---------------------------------------------------------------------------------------
# Setup.


def load_config(overrides: dict):
    """configs/neti.py:tiny with `overrides` ({"dotted.key": value})."""
    config = get_config("tiny")
    config.update_from_flattened_dict(overrides)
    return config


def parse_milestones(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        steps = []
    if not steps or steps != sorted(set(steps)) or steps[0] < 1:
        raise UserError(f"--steps {text!r}: give increasing positive step counts, such as "
                        "100,250,500")
    return steps


def parse_super_categories(pairs: list[str]) -> dict[str, str]:
    chosen = dict(SUPER_CATEGORIES)
    for pair in pairs:
        name, _, word = pair.partition("=")
        if name not in CONCEPTS or not word:
            raise UserError(f"--super-category {pair!r}: write CONCEPT=WORD with CONCEPT one of "
                            f"{', '.join(CONCEPTS)}")
        chosen[name] = word
    return chosen


def check_super_categories(tokenizer, names: list[str], words: dict[str, str]) -> None:
    for name in names:
        try:
            single_token_id(tokenizer, words[name])
        except UserError as err:
            raise UserError(f"{err} (concept {name}): the model's tokenizer does not know it as "
                            f"one word; pass --super-category {name}=WORD") from err


# ---------------------------------------------------------------------------------------
# Pictures.


def plot_tradeoff(path: Path, curve: list[tuple[str, float, float]],
                  others: list[tuple[str, float, float]],
                  seed_curves: list[list[tuple[float, float]]] = ()) -> None:
    """The fidelity-editability curve (labelled points joined in order; the mean over seeds),
    each seed's own curve (thin), and other rows' points, drawn with matplotlib
    (spacetime_jax/plots.py). x is a fraction: its whole range, so that plots of different
    runs compare at a glance."""
    write_png_bytes(path, tradeoff_plot(
        curve, others, thin_curves=seed_curves,
        title="NeTI fidelity-editability over truncation"
              + (f" (mean of {len(seed_curves)} seeds; thin: each seed)"
                 if len(seed_curves) > 1 else ""),
        x_label="prompt fidelity: background color right (edit prompts)",
        y_label="concept fidelity: CLIP similarity to the photos (edit prompts)"))


def seeds_text(seeds_per_prompt: int) -> str:
    return ", ".join(str(SEED_OFFSET + i) for i in range(seeds_per_prompt))


def sample_grid(path: Path, images: dict[str, np.ndarray], seeds_per_prompt: int,
                title: str) -> None:
    """Per concept one row: the plain seeds, then the first seed of each edit background."""
    rows, labels = [], []
    for name, concept_images in images.items():
        edits = [seeds_per_prompt * (1 + i) for i in range(NUM_BACKGROUNDS)]
        rows.append(concept_images[list(range(seeds_per_prompt)) + edits])
        labels.append(f"<{name}>: plain x{seeds_per_prompt}, then on "
                      + ", ".join(edit_backgrounds(CONCEPTS[name].colors)))
    save_grid(path, np.concatenate(rows), rows=len(rows), cols=len(rows[0]), row_labels=labels,
              title=f"{title}: plain seeds {seeds_text(seeds_per_prompt)}, then seed "
                    f"{SEED_OFFSET} on each edit background")


def truncation_grid(path: Path, images: dict[int, dict[str, np.ndarray]],
                    seeds_per_prompt: int, title: str) -> None:
    """Per truncation one row (untruncated last): for each concept its first plain and first
    edit image."""
    order = sorted(t for t in images if t is not None) + [None]
    tiles = [concept_images[[0, seeds_per_prompt]] for t in order
             for concept_images in images[t].values()]
    names = list(images[None])
    save_grid(path, np.concatenate(tiles), rows=len(order), cols=2 * len(names),
              row_labels=["no truncation" if t is None else f"truncation {t}" for t in order],
              col_labels=[f"{n} {kind}" for n in names for kind in ("plain", "edit")],
              title=f"{title}: seed {SEED_OFFSET}, plain and first edit prompt per concept")


# ---------------------------------------------------------------------------------------
# The benchmark.


@dataclasses.dataclass
class Setup:
    """What every method's run shares: the frozen model, the prepared text encoder (all
    placeholders), the concepts' prompts and references, the scorer and sampler settings."""
    sd: Any
    text: Any
    specs: list
    prompts: dict
    references: dict
    embed: ClipEmbedder
    mesh: Any
    resolution: int
    sample_kwargs: dict


def make_row(method, steps, truncation, per_concept, seconds=None) -> dict:
    return dict(method=method, steps=steps, truncation=truncation, seconds_per_concept=seconds,
                per_concept=per_concept, mean=mean_scores(per_concept))


def reference_rows(setup: Setup, words: dict[str, str]) -> list[dict]:
    """No learning: the concept's own renders (ceiling), the super-category word, and the
    concept in the world's words, on the same prompts and seeds."""
    ceiling, super_word, in_words = {}, {}, {}
    for spec in setup.specs:
        name, concept = spec.name, CONCEPTS[spec.name]
        p, reference = setup.prompts[name], setup.references[name]
        ceiling[name] = score(ceiling_renders(concept, p, setup.resolution), p, reference,
                              setup.embed)
        for scores, phrase in ((super_word, words[name]),
                               (in_words, in_world_words(concept, words[name]))):
            images = text_to_image(setup.sd, p.filled(phrase), list(p.seeds),
                                   **setup.sample_kwargs)
            scores[name] = score(images, p, reference, setup.embed)
    return [make_row("renders (ceiling)", None, None, ceiling),
            make_row("super-category word", 0, None, super_word),
            make_row("in words", 0, None, in_words)]


def seed_mean_rows(runs: list[list[dict]]) -> list[dict]:
    """One row per (steps, truncation) with each concept's scores averaged over the runs of
    different seeds (the runs' rows are in the same order)."""
    rows = []
    for same in zip(*runs):
        per_concept = {n: {m: float(np.mean([r["per_concept"][n][m] for r in same]))
                           for m in METRICS} for n in same[0]["per_concept"]}
        seconds = float(np.mean([r["seconds_per_concept"] for r in same]))
        rows.append(make_row(same[0]["method"], same[0]["steps"], same[0]["truncation"],
                             per_concept, seconds))
    return rows


def truncation_curves(runs: list[list[dict]], last: int) -> list[list[tuple[int, dict]]]:
    """Per run, the (truncation, mean scores) of its rows at step `last` that name a
    truncation, from the smallest index up."""
    return [sorted((r["truncation"], r["mean"]) for r in rows
                   if r["steps"] == last and r["truncation"] is not None) for rows in runs]


def run_method(setup: Setup, method: str, model: str, milestones: list[int], workdir: Path,
               log, seed: int = 0) -> tuple[list[dict], dict]:
    """Trains every concept at once with `method` (train.seed `seed`) to each milestone and
    scores it there (NeTI at the last milestone also per truncation). Returns the rows and, at
    the last milestone, the images by truncation (None: untruncated) and concept."""
    config = load_config({"model": model, "data.resolution": setup.resolution,
                          "train.seed": seed, **METHODS[method]})
    session = build_session(config, setup.sd, setup.text, setup.specs, setup.mesh, workdir)
    session.put()
    state = sharding.shard_put(session.initial_state, session.state_shardings)
    tic = time.perf_counter()
    step = session.step_fn().lower(state, session.data, session.frozen,
                                   session.schedule).compile()
    log(f"{method} (seed {seed}): step compiled in {time.perf_counter() - tic:.1f} s")
    width = session.mapper_config.hidden_width
    rows, last_images, train_seconds, done = [], {}, 0.0, 0
    for milestone in milestones:
        tic = time.perf_counter()
        for _ in range(done, milestone):
            state, loss = step(state, session.data, session.frozen, session.schedule)
        loss = np.asarray(loss)  # waits for the last step
        train_seconds += time.perf_counter() - tic
        done = milestone
        last = milestone == milestones[-1]
        # Truncation at hidden_width keeps every dimension: the untruncated row, not resampled.
        truncations = [None] + ([t for t in TRUNCATIONS if t < width]
                                if method == "neti" and last else [])
        results = {t: {} for t in truncations}
        tic = time.perf_counter()
        every_concept = concepts_to_host(state.params, session.data.encoding,
                                         len(setup.specs))
        for k, spec in enumerate(setup.specs):
            variables = every_concept[k]
            p = setup.prompts[spec.name]
            for truncation in truncations:
                images = generate(setup.sd, setup.text, session.concepts[k],
                                  setup.text.placeholder_ids[k],
                                  session.concepts[k].target_norm, p.filled(spec.placeholder),
                                  list(p.seeds), variables=variables, truncation=truncation,
                                  **setup.sample_kwargs)
                results[truncation][spec.name] = score(images, p, setup.references[spec.name],
                                                       setup.embed)
                if last:
                    last_images.setdefault(truncation, {})[spec.name] = images
        seconds = train_seconds / len(setup.specs)
        rows += [make_row(method, milestone, t, r, seconds) for t, r in results.items()]
        if len(truncations) > 1 and width in TRUNCATIONS:
            rows.append(make_row(method, milestone, width, results[None], seconds))
        m = mean_scores(results[None])
        log(f"{method} (seed {seed}) step {milestone}: loss {float(loss.mean()):.4f}, {seconds:.1f} s per "
            f"concept; scored in {time.perf_counter() - tic:.1f} s: clip_edit "
            f"{m['clip_edit']:.3f} shape_edit {m['shape_edit']:.3f} bg {m['bg']:.3f}")
    return rows, last_images


# ---------------------------------------------------------------------------------------
# ELITE: one encoder pass per concept, no per-concept training.


@dataclasses.dataclass
class EliteEncoder:
    """A trained encoder folder, loaded: the frozen model it runs on and its params."""
    folder: Path
    model: Any   # spacetime_jax.elite.sample.EliteModel
    params: Any  # spacetime_jax.elite.sample.EncoderParams
    training: dict  # stage -> wall seconds of its training loop (None: unknown)


def photo_with_mask(concept, photo: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """ELITE's input: photo ELITE_PHOTO (uint8 (S, S, 3)) and its object mask ((S, S, 1) 0/1),
    rendered again from the draws render_concept_images makes for it (seed 0)."""
    name_key = zlib.crc32(concept.name.encode())
    image, mask = render(concept.scene(np.random.default_rng([0, ELITE_PHOTO, name_key])), size)
    if not np.array_equal(image, photo):
        raise RuntimeError(f"{concept.name}: re-rendering photo {ELITE_PHOTO} did not give the "
                           "photo render_concept_images made; its draws changed")
    return image, mask[..., None].astype(np.float32)


def last_elapsed_seconds(workdir: Path) -> float | None:
    """The training loop's wall time a workdir's metrics.jsonl last logged (after compile; a
    resumed run's counts from its resumption)."""
    path = workdir / METRICS_FILE
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records[-1].get("elapsed_s") if records else None


def encoder_training_seconds(folder: Path, artifact: EncoderArtifact) -> dict:
    """Stage -> wall seconds from the training workdirs' metrics: the folder is WORKDIR/encoder;
    a two-stage encoder's stage-1 workdir is its train config's global_checkpoint."""
    if artifact.local_params is None:
        return {"stage 1": last_elapsed_seconds(folder.parent)}
    checkpoint = artifact.extra.get("train_config", {}).get("global_checkpoint")
    stage1 = None
    if checkpoint:
        checkpoint = Path(checkpoint).expanduser()
        workdir = checkpoint if (checkpoint / "encoder").is_dir() else checkpoint.parent
        stage1 = last_elapsed_seconds(workdir)
    return {"stage 1": stage1, "stage 2": last_elapsed_seconds(folder.parent)}


def elite_model_config(model: str, artifact: EncoderArtifact):
    """configs/elite_global.py:tiny on `model`, with the encoder's image tower, placeholder and
    mapper sizes."""
    config = elite_configs.get_config("tiny")
    config.model = model
    config.image_encoder = artifact.image_encoder or ""
    config.placeholder = artifact.extra.get("placeholder", config.placeholder)
    config.encoder.feature_layers = tuple(artifact.config.feature_layers)
    config.encoder.hidden_width = artifact.config.hidden_width
    return config


def load_elite_encoder(folder: str, model: str, model_dir: Path, needs_local: bool,
                       models: dict) -> EliteEncoder:
    """The encoder folder and the frozen model it runs on; `models` caches the latter by what
    it is built from, so encoders on the same model share it (and its compiled sampler)."""
    flag = "--elite-local" if needs_local else "--elite-global"
    resolved = Path(encoder_folder(folder))  # a training workdir's encoder/, or the folder
    artifact = load_encoder(resolved)
    if needs_local and artifact.local_params is None:
        raise UserError(f"{flag} {folder}: this encoder has no local stage; give a stage-2 "
                        "encoder folder (WORKDIR/encoder of an elite_local run)")
    if Path(resolve_builtin(artifact.base_model)).resolve() != model_dir.resolve():
        raise UserError(f"{flag} {folder}: the encoder was trained on {artifact.base_model}, "
                        f"not on --model {model}; pass --model {artifact.base_model}")
    config = elite_model_config(model, artifact)
    key = (config.image_encoder, config.placeholder, artifact.config)
    if key not in models:
        models[key] = elite_sample.load_model(config)
    elite_model = models[key]
    if elite_model.encoder_config != artifact.config:
        raise UserError(f"{flag} {folder}: its mappers ({artifact.config}) do not fit the "
                        f"model's image tower ({elite_model.encoder_config})")
    g, l = artifact.global_params, artifact.local_params
    params = elite_sample.EncoderParams(
        global_mapper=g["mapper"], global_kv=g["kv"],
        local_mapper=l["mapper"] if needs_local else None,
        local_kv=l["kv"] if needs_local else None)
    return EliteEncoder(resolved, elite_model, params,
                        encoder_training_seconds(resolved, artifact))


def encode_seconds(encoder: EliteEncoder, image: np.ndarray, mask: np.ndarray) -> tuple:
    """(words, tokens) of one image and the median wall time of one encoder pass after the
    compiling call."""
    encode = lambda: elite_sample.encode_images(encoder.model, encoder.params, image[None],
                                                mask[None])
    times, (words, tokens) = time_fn(encode, steps=ENCODE_TIMED_CALLS, warmup=1)
    return words, tokens, median(times)


def elite_variants(encoders: dict) -> list[tuple[str, str, float | None, int | None]]:
    """(row name, encoder kind, lambda, token index) of the rows the given encoders make:
    word 0 alone (the reference's inference scripts; stage 2 trains with it) and, for the
    global words, all five (its inference script's default; stage 1 trains with them)."""
    variants = ([("elite_global", "global", None, 0), ("elite_global_all", "global", None, None)]
                if "global" in encoders else [])
    if "local" in encoders:
        variants += [(f"elite_local_l{scale}", "local", scale, 0) for scale in ELITE_LAMBDAS]
    return variants


def elite_rows(setup: Setup, encoders: dict, inputs: dict, log) -> tuple[list[dict], dict]:
    """Each ELITE variant's row (s/concept: one encoder pass of the concept's image) and its
    images by concept."""
    encoded = {}  # (kind, concept) -> (words, tokens, seconds)
    for kind, encoder in encoders.items():
        for name, (image, mask) in inputs.items():
            encoded[kind, name] = encode_seconds(encoder, image, mask)
        mean = np.mean([encoded[kind, n][2] for n in inputs])
        log(f"ELITE {kind} encoder ({encoder.folder}): {mean * 1e3:.2f} ms per image")
    rows, images = [], {}
    for method, kind, scale, token_index in elite_variants(encoders):
        encoder, per_concept = encoders[kind], {}
        tic = time.perf_counter()
        for name, (image, mask) in inputs.items():
            p = setup.prompts[name]
            words, tokens, _ = encoded[kind, name]
            n = len(p.seeds)
            out = elite_sample.generate(
                encoder.model, encoder.params, np.repeat(image[None], n, 0),
                np.repeat(mask[None], n, 0),
                elite_prompts(p.templates, encoder.model.text.placeholder), list(p.seeds),
                local_scale=scale, token_index=token_index,
                words=jnp.repeat(words, n, axis=0),
                tokens=None if scale is None else jnp.repeat(tokens, n, axis=0),
                **setup.sample_kwargs)
            per_concept[name] = score(out, p, setup.references[name], setup.embed)
            images[method] = {**images.get(method, {}), name: out}
        seconds = float(np.mean([encoded[kind, n][2] for n in inputs]))
        rows.append(make_row(method, 0, None, per_concept, seconds))
        m = rows[-1]["mean"]
        log(f"{method}: scored in {time.perf_counter() - tic:.1f} s: clip_edit "
            f"{m['clip_edit']:.3f} shape_edit {m['shape_edit']:.3f} bg {m['bg']:.3f}")
    return rows, images


def elite_notes(encoders: dict) -> list[str]:
    """What the ELITE rows' s/concept leaves out: the encoder's training, amortized."""
    if not encoders:
        return []
    fmt = lambda v: "unknown" if v is None else f"{v:.0f} s"
    lines = [f"ELITE s/concept: one encoder pass of the concept's photo {ELITE_PHOTO} (median of "
             f"{ENCODE_TIMED_CALLS} after compile); ELITE trains nothing per concept. Its "
             "encoder's own training is amortized over every concept it is used on:"]
    for kind, encoder in encoders.items():
        parts = encoder.training
        total = (None if any(v is None for v in parts.values())
                 else sum(parts.values()))
        lines.append(f"  {kind} encoder {encoder.folder}: "
                     + " + ".join(f"{stage} {fmt(v)}" for stage, v in parts.items())
                     + f" = {fmt(total)} training-loop wall time (metrics.jsonl elapsed_s; "
                     "compile and model load not included)")
    return lines


def print_report(rows: list[dict], names: list[str], milestones: list[int], args,
                 trained: bool = True) -> None:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    # Sub-second times (an ELITE encoder pass) keep their significant digits.
    seconds = lambda v: fmt(v, ".1f" if v is None or v >= 0.1 else ".4f")
    for group, members in concept_groups(names).items():
        table = [[r["method"], fmt(r["steps"], "d"), fmt(r["truncation"], "d")]
                 + [f"{v:.3f}" for v in group_means(r, members).values()]
                 + [seconds(r["seconds_per_concept"])] for r in rows]
        print()
        print(f"model {args.model}; {group} concepts ({', '.join(members)}); "
              f"{(1 + NUM_BACKGROUNDS) * args.seeds_per_prompt} images per concept and row "
              f"({args.seeds_per_prompt} seeds x 1 plain + {NUM_BACKGROUNDS} background "
              f"prompts), {args.sample_steps} {args.sampler} steps, guidance {args.guidance}; "
              "means over these concepts")
        print(format_table(["method", "steps", "trunc"] + list(METRICS) + ["s/concept"], table))
    print()
    print("per concept, clip_edit / shape_edit / color / bg"
          + (f" at step {milestones[-1]}:" if trained else " (no NeTI method trained):"))
    shown = [r for r in rows if r["steps"] in (None, 0)
             or (r["steps"] == milestones[-1] and r["truncation"] is None)]
    print(format_table(["method"] + names,
                       [[r["method"]] + ["/".join(f"{r['per_concept'][n][m]:.2f}" for m in
                                                  ("clip_edit", "shape_edit", "color", "bg"))
                                         for n in names] for r in shown]))


def print_curve(curves: list[list[tuple[int, dict]]], seeds: list[int]) -> None:
    """NeTI's truncation curve at the last milestone: each metric's mean +- standard
    deviation over the seeds' runs (each run's value a mean over concepts)."""
    if not curves or not curves[0]:
        return
    print()
    print(f"NeTI truncation curve over seeds {', '.join(map(str, seeds))} (mean +- std of the "
          "per-seed means over concepts):")
    table = []
    for i, (truncation, _) in enumerate(curves[0]):
        values = {m: [run[i][1][m] for run in curves] for m in METRICS}
        table.append([str(truncation)] + [f"{np.mean(v):.3f} +- {np.std(v):.3f}"
                                          for v in values.values()])
    print(format_table(["trunc"] + list(METRICS), table))


def write_pictures(out: Path, rows: list[dict], images: dict, photos: dict,
                   milestones: list[int], seeds_per_prompt: int,
                   elite_images: dict | None = None,
                   seed_curves: list[list[tuple[int, dict]]] = ()) -> None:
    """The fidelity-editability plot, the photos, and sample grids at the last milestone."""
    last = milestones[-1]
    curve = [(f"t={r['truncation']}", r["mean"]["bg"], r["mean"]["clip_edit"])
             for r in rows if r["method"] == "neti" and r["truncation"] is not None]
    thin = [[(m["bg"], m["clip_edit"]) for _, m in run] for run in seed_curves]
    others = [(r["method"], r["mean"]["bg"], r["mean"]["clip_edit"]) for r in rows
              if r["steps"] == 0 or (r["steps"] == last and r["truncation"] is None
                                     and r["method"] != "neti")]
    if curve:
        plot_tradeoff(out / "fidelity_editability.png", curve, others, thin)
    save_grid(out / "photos.png", np.concatenate(list(photos.values())), rows=len(photos),
              cols=NUM_PHOTOS, row_labels=[f"<{n}> training photos" for n in photos],
              title="the training photos of each held-out concept (render seed 0)")
    for method, by_truncation in images.items():
        sample_grid(out / f"samples_{method}_step{last}.png", by_truncation[None],
                    seeds_per_prompt, f"{method}, step {last}")
        if len(by_truncation) > 1:
            truncation_grid(out / f"samples_{method}_step{last}_truncations.png",
                            by_truncation, seeds_per_prompt, f"{method}, step {last}")
    for method, by_concept in (elite_images or {}).items():
        sample_grid(out / f"samples_{method}.png", by_concept, seeds_per_prompt, method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:toyworld")
    parser.add_argument("--steps", default="100,250,500",
                        help="milestones (training steps) at which every method is scored")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"NeTI methods to train ({', '.join(METHODS)}), comma-separated; "
                             f"'{NO_METHODS}': none; '{ELITE}': the ELITE rows (needs "
                             "--elite-global or --elite-local), e.g. --methods elite")
    parser.add_argument("--elite-global", default=None, metavar="DIR",
                        help="a stage-1 ELITE training workdir (or its encoder/ folder): "
                             "adds the elite_global row")
    parser.add_argument("--elite-local", default=None, metavar="DIR",
                        help="a stage-2 ELITE training workdir (or its encoder/ folder): "
                             "adds the elite_local_l0.6 and "
                             "elite_local_l1.0 rows")
    parser.add_argument("--concepts", default=",".join(CONCEPTS))
    parser.add_argument("--super-category", action="append", default=[],
                        metavar="CONCEPT=WORD", help="override a concept's initializer word")
    parser.add_argument("--seeds-per-prompt", type=int, default=4)
    parser.add_argument("--curve-seeds", default="0,1,2",
                        help="train.seed of each NeTI run (its rows average over them, its "
                             "truncation curve shows their spread)")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "neti_quality"),
                        help="folder for the plot, grids, photos and results.json")
    args = parser.parse_args()

    milestones = parse_milestones(args.steps)
    words_given = [m for m in args.methods.split(",") if m]
    names = [n for n in args.concepts.split(",") if n]
    for method in words_given:
        if method not in (*METHODS, NO_METHODS, ELITE):
            raise UserError(f"--methods: unknown method {method!r}; known: {', '.join(METHODS)}, "
                            f"or {NO_METHODS} (no NeTI training), {ELITE} (the ELITE rows)")
    methods = [m for m in words_given if m in METHODS]
    if NO_METHODS in words_given and methods:
        raise UserError(f"--methods {args.methods}: '{NO_METHODS}' trains no NeTI method; give "
                        "it alone or leave it out")
    elite_folders = {kind: folder for kind, folder in (("global", args.elite_global),
                                                       ("local", args.elite_local)) if folder}
    if ELITE in words_given and not elite_folders:
        raise UserError(f"--methods {args.methods}: the ELITE rows need an encoder: pass "
                        "--elite-global DIR and/or --elite-local DIR")
    for name in names:
        if name not in CONCEPTS:
            raise UserError(f"--concepts: unknown concept {name!r}; known: "
                            f"{', '.join(CONCEPTS)}")
    if args.seeds_per_prompt < 1:
        raise UserError("--seeds-per-prompt must be at least 1")
    try:
        curve_seeds = [int(x) for x in args.curve_seeds.split(",") if x.strip()]
    except ValueError:
        curve_seeds = []
    if not curve_seeds or len(set(curve_seeds)) != len(curve_seeds) or min(curve_seeds) < 0:
        raise UserError(f"--curve-seeds {args.curve_seeds!r}: give distinct seeds >= 0, such "
                        "as 0,1,2")
    words = parse_super_categories(args.super_category)
    out = Path(args.out)
    start = time.perf_counter()
    log = lambda message: print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    model_dir = Path(resolve_builtin(args.model))
    sd = load_stable_diffusion(model_dir)
    check_super_categories(sd.tokenizer, names, words)
    embed = ClipEmbedder(model_dir)
    # Encoders first: a wrong folder must not wait for the references' sampling.
    elite_models: dict = {}
    encoders = {kind: load_elite_encoder(folder, args.model, model_dir, kind == "local",
                                         elite_models)
                for kind, folder in elite_folders.items()}
    resolution = sd.unet.config.sample_size * sd.vae_config.downsample_factor
    specs = [ConceptSpec(name, str(out / "photos" / name), f"<{name}>", words[name])
             for name in names]
    prompts, references, photos, elite_inputs = {}, {}, {}, {}
    for name in names:
        concept = CONCEPTS[name]
        write_concept_images(concept, out / "photos" / name, NUM_PHOTOS, seed=0, size=resolution)
        photos[name] = np.stack(render_concept_images(concept, NUM_PHOTOS, seed=0,
                                                      size=resolution))
        references[name] = Reference(embed(photos[name]),
                                     fidelity.reference_silhouettes(photos[name]), concept.color)
        prompts[name] = evaluation_prompts(concept, args.seeds_per_prompt)
        elite_inputs[name] = photo_with_mask(concept, photos[name][ELITE_PHOTO], resolution)
    text = prepare_text_encoder(sd.text_encoder, sd.tokenizer, sd.text_params,
                                [s.placeholder for s in specs], [s.super_category for s in specs])
    setup = Setup(sd=sd, text=text, specs=specs, prompts=prompts, references=references,
                  embed=embed, mesh=make_mesh({"concept": 1, "data": 1, "model": 1},
                                              jax.devices()[:1]),
                  resolution=resolution,
                  sample_kwargs=dict(num_steps=args.sample_steps, guidance_scale=args.guidance,
                                     method=args.sampler))
    log(f"model {args.model} ({resolution} px); concepts "
        + ", ".join(f"{s.placeholder} from {s.super_category!r}" for s in specs))

    rows = reference_rows(setup, words)
    log("references scored")
    elite_method_rows, elite_images = elite_rows(setup, encoders, elite_inputs, log)
    rows += elite_method_rows
    images, curves = {}, []
    # Latent caches in a fresh folder: a cache is keyed on the model's path, not its weights.
    with tempfile.TemporaryDirectory() as work:
        for method in methods:
            seeds = curve_seeds if method == "neti" else [0]
            runs = []
            for seed in seeds:
                seed_rows, seed_images = run_method(setup, method, args.model, milestones,
                                                    Path(work) / f"{method}_seed{seed}", log,
                                                    seed)
                runs.append(seed_rows)
                images.setdefault(method, seed_images)  # the first seed's pictures
            rows += seed_mean_rows(runs)
            if method == "neti":
                curves = truncation_curves(runs, milestones[-1])

    print_report(rows, names, milestones, args, trained=bool(methods))
    print_curve(curves, curve_seeds)
    for line in elite_notes(encoders):
        print(line)
    write_pictures(out, rows, images, photos, milestones, args.seeds_per_prompt, elite_images,
                   curves)
    (out / "results.json").write_text(json.dumps(dict(
        model=args.model, milestones=milestones, concepts=names,
        group_means={group: [dict(method=r["method"], steps=r["steps"],
                                  truncation=r["truncation"], mean=group_means(r, members))
                             for r in rows]
                     for group, members in concept_groups(names).items()},
        super_categories={n: words[n] for n in names}, seeds_per_prompt=args.seeds_per_prompt,
        sample_steps=args.sample_steps, guidance=args.guidance, sampler=args.sampler,
        prompts={n: dataclasses.asdict(p) for n, p in prompts.items()},
        elite_encoders={kind: dict(folder=str(e.folder), training_seconds=e.training)
                        for kind, e in encoders.items()},
        elite_photo=ELITE_PHOTO, rows=rows, curve_seeds=curve_seeds,
        truncation_curves=[[dict(truncation=t, mean=m) for t, m in run] for run in curves]),
        indent=1) + "\n")
    log(f"done; plot, sample grids and results.json in {out}")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:  # bad input: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
