"""ELITE stage 2: the local mapper (per-patch tokens of the masked object) and the U-Net's
to_k_local/to_v_local, on a frozen stage-1 encoder.

  python -m spacetime_jax.main --config=configs/elite_local.py --workdir=runs/elite_local \
      --config.data.root=/data/openimages --config.global_checkpoint=runs/elite_global

global_checkpoint: a stage-1 workdir (its encoder/ folder is read) or an encoder folder
(e.g. one imported from the official global_mapper.pt). Writes WORKDIR/encoder/ with both
stages, checkpoints, metrics and validation grids (columns: seeds x lambda).

sd15: the reference's defaults: batch 8 x 4 accumulation, base lr 1e-5 per sample x 32
      (3.2e-4), lambda 1 in training, ~65k steps; only word 0 is injected.
tiny: the toy-world model and objects, a few minutes on 2 CPU cores.
"""
import importlib.util
from pathlib import Path

import ml_collections

# configs/ is no package: the stage-1 config is loaded by path.
_spec = importlib.util.spec_from_file_location("elite_global_config",
                                               Path(__file__).with_name("elite_global.py"))
elite_global = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(elite_global)


VARIANTS = {  # get_config's variants (the default first), one line each for --help
    "sd15": "the reference's defaults: batch 8 x 4 accumulation, lr 1e-5 x 32, ~65k steps",
    "tiny": "the toy-world model and objects, a few minutes on 2 CPU cores",
}


def get_config(arg: str = "sd15") -> ml_collections.ConfigDict:
    c = elite_global.get_config("sd15")
    c.unlock()
    c.stage = "local"
    # Stage 2's object filter, as the reference's OpenImagesDatasetWithMask: both box sides
    # >= 100 px and an aspect ratio in 0.5..2, whatever the area; padded by 10..19 px.
    c.data.min_side = 100
    c.data.min_aspect = 0.5
    c.data.max_aspect = 2.0
    c.data.min_area = 0.0
    c.data.max_area = 1.0
    c.data.pad_min = 10
    c.data.pad_max = 19
    c.train.batch_size = 8
    c.train.grad_accum = 4
    c.train.learning_rate = 1e-5
    c.train.steps = 65000
    c.validation.local_scales = (0.6, 1.0)
    c.validation.prompts = ("a photo of a {}", "a {} on the beach", "a {} in the snow")
    if arg == "tiny":
        elite_global.apply_tiny(c)
        c.validation.local_scales = (0.6, 1.0)
        c.validation.prompts = elite_global.TOYWORLD_PROMPTS
    elif arg != "sd15":
        raise ValueError(f"unknown variant {arg!r} of configs/elite_local.py "
                         f"({', '.join(VARIANTS)})")
    c.validation.token_index = "0"  # stage 2 trains and samples with word 0 alone
    c.lock()
    return c
