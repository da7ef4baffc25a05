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


def get_config(arg: str = "sd15") -> ml_collections.ConfigDict:
    c = elite_global.get_config("sd15")
    c.unlock()
    c.stage = "local"
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
        raise ValueError(f"unknown variant {arg!r} of configs/elite_local.py (tiny, sd15)")
    c.validation.token_index = "0"  # stage 2 trains and samples with word 0 alone
    c.lock()
    return c
