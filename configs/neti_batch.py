"""NeTI batch personalization: many concepts learned in one run, one mapper each.

  python -m spacetime_jax.main --config=configs/neti_batch.py --workdir=runs/batch \
      --config.data.concepts=DIR

DIR holds one sub-folder of images per concept (placeholder `<sub-folder>`, super-category
concept.super_category, required then, learnable property concept.learnable_property), or
a manifest (DIR/concepts.csv, or --config.data.concepts=FILE.csv) with one concept per line:

    folder, placeholder, super-category[, object|style]
    cat_photos, <my-cat>, cat
    monet, <monet>, painting, style

Every concept is checked (images, placeholders, super-categories) before anything is computed.
The K concepts train side by side in one compiled step: K is spread over the mesh's `concept`
axis (padded up to a multiple of it; the padding learns nothing and is never written), each
concept's batch over `data`, big frozen U-Net kernels over `model`. train.batch_size is per
data replica and the learning rate scales with a concept's own replicas, so a concept learns
what it would alone on as many replicas (same seed: concept_seed(train.seed, placeholder)).

Writes WORKDIR/concepts/<name>/ (each concept's artifact, the same files as a single run's
WORKDIR/concept/), WORKDIR/validation/step_N/<name>.png, WORKDIR/checkpoints/ (the whole
batch; rerunning the same command resumes; SIGTERM saves one and exits with status 143) and
WORKDIR/metrics.jsonl (the loss averaged over the concepts).

sd15: the reference's defaults of configs/neti.py:sd15 for every concept; concepts over all
      devices (mesh concept=-1).
tiny: configs/neti.py:tiny's settings on the shipped toy-world model. Its four held-out
      concepts make a demo batch:
        for c in crescent arrow bolt polka_heart; do
          python -m spacetime_jax.toyworld.write_concept --concept $c --out batch/$c
        done
        cat > batch/concepts.csv <<EOF
        crescent, <crescent>, circle
        arrow, <arrow>, triangle
        bolt, <bolt>, star
        polka_heart, <polka-heart>, heart
        EOF
        python -m spacetime_jax.main --config=configs/neti_batch.py:tiny \
            --workdir=runs/batch --config.data.concepts=batch
"""
import importlib.util
from pathlib import Path

import ml_collections


def _single_concept_config(arg: str) -> ml_collections.ConfigDict:
    """configs/neti.py's config of the same variant (loaded by path: configs is no package)."""
    spec = importlib.util.spec_from_file_location("neti_config",
                                                  Path(__file__).with_name("neti.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


VARIANTS = {  # get_config's variants (the default first), one line each for --help
    "sd15": "configs/neti.py:sd15's settings for every concept, concepts over all devices",
    "tiny": "configs/neti.py:tiny's settings on the shipped toy-world model (a demo batch of "
            "its held-out concepts)",
}


def get_config(arg: str = "sd15") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/neti_batch.py "
                         f"({', '.join(VARIANTS)})")
    c = _single_concept_config(arg)
    c.unlock()
    # The concepts come from data.concepts; `concept` holds the sub-folders' defaults.
    del c.concept["placeholder"]
    c.data.images = ""
    c.data.concepts = ""
    c.mesh = ml_collections.ConfigDict({"concept": -1, "data": 1, "model": 1})
    c.lock()
    return c
