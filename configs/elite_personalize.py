"""ELITE personalization: a trained encoder turns each image into words in one forward pass,
then Stable Diffusion draws the object in new prompts; no per-object training.

  python -m spacetime_jax.main --config=configs/elite_personalize.py --workdir=runs/cat_elite \
      --config.encoder=runs/elite_local --config.images=photos/cat.jpg \
      --config.masks=photos/cat_mask.png

encoder: an encoder folder (encoder.json + safetensors) or a training workdir holding encoder/.
images:  one image file or a folder of images (all of them are encoded in one batched pass).
masks:   "" = none (the whole image is the object); one mask file for one image; or a folder
         with one mask per image, matched by file stem (photos/cat.jpg <- masks/cat.png). White
         (or 1 in a 0/1 label map) is the object. A mask of another size but the same aspect
         ratio is resized (nearest); another aspect ratio is an error.
prompts: each holds "{}" once, where the object's words go.
local_scales: lambda of the local branch (a grid: one column per seed and lambda; 0 turns it
         off). A global-only encoder ignores them.
token_index: "0" injects the primary word only (the reference's shell scripts), "all" every
         word (its inference script's default).

Writes WORKDIR/<image stem>.png (rows prompts; columns the input, then seeds x lambdas), each
image as WORKDIR/<image stem>/<prompt index>_<seed>_l<lambda>.png (_global.png for a
global-only encoder) and WORKDIR/summary.json (encoding seconds per image, every row, settings).

sd15: the reference's sampling: 100 LMS steps, guidance 5, lambdas 0.6 and 0.8.
tiny: the shipped toy-world model's settings (64 px, 20 steps, guidance 4, toy-world prompts),
      for an encoder trained with configs/elite_global.py:tiny / elite_local.py:tiny.
"""
import ml_collections

PROMPTS = ("a photo of a {}", "a photo of a {} on the beach",
           "a painting of a {} in the style of Monet", "a {} in the snow")
TOYWORLD_PROMPTS = ("a photo of a {} on a green background",
                    "a photo of a {} on a purple background",
                    "a photo of a {} on a yellow background")


VARIANTS = {  # get_config's variants (the default first), one line each for --help
    "sd15": "the reference's sampling: 100 LMS steps, guidance 5, lambdas 0.6 and 0.8",
    "tiny": "the toy-world model's settings (64 px, 20 steps, guidance 4), for an encoder "
            "trained with the tiny ELITE configs",
}


def get_config(arg: str = "sd15") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "elite_personalize"
    c.encoder = ""   # required: an encoder folder or a training workdir holding encoder/
    c.images = ""    # required: an image file or a folder of images
    c.masks = ""
    c.prompts = PROMPTS
    c.seeds = (42, 43)
    c.local_scales = (0.6, 0.8)
    c.token_index = "0"
    c.steps = 100
    c.guidance_scale = 5.0
    c.sampler = "lms"
    c.batch_size = 8  # generated rows per compiled call (the last call is padded)
    # "" = the ones the encoder was trained with (encoder.json), at the revision it was
    # trained on; model_revision pins a hub id's branch, tag or commit.
    c.model = ""
    c.model_revision = ""
    c.image_encoder = ""
    c.compute_dtype = "float32"
    # The U-Net's attention kernel: auto (cudnn on GPUs, splash on TPUs, xla elsewhere),
    # xla, cudnn or splash (spacetime_jax/models/attention_kernels.py).
    c.attention = "auto"
    if arg == "tiny":
        c.prompts = TOYWORLD_PROMPTS
        c.seeds = (0, 1)
        c.steps = 20
        c.guidance_scale = 4.0
    elif arg != "sd15":
        raise ValueError(f"unknown variant {arg!r} of configs/elite_personalize.py "
                         f"({', '.join(VARIANTS)})")
    c.lock()
    return c
