"""NeTI: learn one concept's neural space-time mapper on a frozen Stable Diffusion.

  python -m spacetime_jax.main --config=configs/neti.py:tiny --workdir=runs/cat \
      --config.data.images=path/to/cat --config.concept.placeholder='<my-cat>' \
      --config.concept.super_category=cat

Writes WORKDIR/concept/ (mapper.safetensors + concept.json: the artifact the sampler loads),
WORKDIR/checkpoints/ (orbax; rerunning the same command resumes), WORKDIR/metrics.jsonl and
WORKDIR/validation/step_N/<name>.png (the reference's 4 prompts x 4 seeds).

sd15: the reference's defaults exactly: SD 1.5, 512 px, batch 2 x 4 accumulation, lr 1e-3
      scaled by batch x accumulation x the concept's data-parallel replicas (8e-3 on one
      device), 1000 steps, checkpoints every 250, fp32, DPM-Solver++ 50 steps for validation.
tiny: the README's main command: the shipped toy-world model (builtin:toyworld, 64 px) learns
      the bundled held-out concept "crescent" (5 photos of a yellow crescent, a shape the
      pretraining never drew; super-category "circle"), batch 2 x 2, 200 steps, then samples
      it on prompted backgrounds (validation grid, 20 steps, at the end); a few minutes on
      2 CPU cores:
        python -m spacetime_jax.main --config=configs/neti.py:tiny --workdir=runs/crescent
      -> runs/crescent/validation/step_000200/crescent.png (rows prompts, columns seeds).
      Point data.images / concept.* elsewhere to learn another concept on the same model.
"""
import ml_collections

from spacetime_jax.models.builtin import ASSETS

VALIDATION_PROMPTS = ("A photo of a {}", "A photo of a {} on a beach", "App icon of {}",
                      "A painting of {} in the style of Monet")
# The toy world's captions end with the background: these test editability there.
TOYWORLD_PROMPTS = ("a photo of a {}", "a photo of a {} on a green background",
                    "a photo of a {} on a purple background",
                    "a photo of a {} on a white background")


def get_config(arg: str = "sd15") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "neti"
    c.model = "runwayml/stable-diffusion-v1-5"
    c.compute_dtype = "float32"

    c.concept = ml_collections.ConfigDict()
    c.concept.placeholder = "<concept>"
    c.concept.super_category = "object"
    c.concept.learnable_property = "object"  # object | style

    c.data = ml_collections.ConfigDict()
    c.data.images = ""
    c.data.resolution = 512

    c.mapper = ml_collections.ConfigDict()
    c.mapper.kind = "neti"  # neti | textual_inversion (the baseline)
    c.mapper.use_bypass = True
    c.mapper.nested_dropout = True
    c.mapper.nested_dropout_prob = 0.5
    c.mapper.encoder = "fourier"  # fourier | plain
    c.mapper.num_frequencies = 1024
    c.mapper.sigma_t = 0.03
    c.mapper.sigma_l = 2.0
    c.mapper.num_anchor_timesteps = 10
    c.mapper.hidden_width = 128

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 2
    c.train.grad_accum = 4
    c.train.learning_rate = 1e-3
    c.train.scale_lr = True
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.weight_decay = 1e-2
    c.train.seed = 0
    c.train.log_every = 10
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    # Activation checkpointing of the frozen U-Net's ResNet and transformer blocks, for
    # batches or resolutions that do not fit: none | full | dots | dots_saveable
    # (spacetime_jax/training/remat.py). The results are the same; the memory is not.
    c.train.remat_policy = "none"

    c.validation = ml_collections.ConfigDict()
    c.validation.every = 250  # 0: never
    c.validation.prompts = VALIDATION_PROMPTS
    c.validation.seeds = (42, 420, 501, 5456)
    c.validation.steps = 50
    c.validation.guidance_scale = 7.5
    c.validation.sampler = "dpmpp_2m"

    c.mesh = ml_collections.ConfigDict({"concept": 1, "data": -1, "model": 1})
    c.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 0, "process_id": -1})

    if arg == "tiny":
        c.model = "builtin:toyworld"
        c.concept.placeholder = "<crescent>"
        c.concept.super_category = "circle"
        c.data.images = str(ASSETS / "concepts" / "crescent")
        c.data.resolution = 64
        c.validation.prompts = TOYWORLD_PROMPTS
        c.validation.guidance_scale = 4.0
        c.train.steps = 200
        c.train.grad_accum = 2
        c.train.log_every = 20
        c.train.checkpoint_every = 50
        c.validation.every = 200
        c.validation.steps = 20
    elif arg != "sd15":
        raise ValueError(f"unknown variant {arg!r} of configs/neti.py (tiny, sd15)")
    c.lock()
    return c
