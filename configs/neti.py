"""NeTI: learn one concept's neural space-time mapper on a frozen Stable Diffusion.

  python -m spacetime_jax.main --config=configs/neti.py:tiny --workdir=runs/cat \
      --config.data.images=path/to/cat --config.concept.super_category=cat

The concept is a folder of its photos (data.images). Its placeholder is the folder's name
in angle brackets, spaces made '-' ("my cat" -> <my-cat>; concept.placeholder overrides it).
Its super-category, one word of the model's vocabulary that says what it is (cat, toy,
circle), must be given: a run without it stops before anything loads but the tokenizer and
lists one-token nouns of the model.

Writes WORKDIR/concept/ (mapper.safetensors + concept.json: the artifact the sampler loads,
with the training config, model and model_revision included), WORKDIR/checkpoints/ (orbax;
rerunning the same command resumes), WORKDIR/metrics.jsonl and
WORKDIR/validation/step_N/<name>.png (the validation prompts x seeds).

model: a diffusers-layout folder or a hub id; model_revision pins a hub id's revision (a
      branch, tag or commit hash; "" = the hub's default branch; a folder ignores it).
sd15: the reference's defaults exactly: its base model, SD v1-4 (the NeTI paper and code
      trained on CompVis/stable-diffusion-v1-4; SD 1.5 has the same shapes:
      --config.model=stable-diffusion-v1-5/stable-diffusion-v1-5), 512 px, batch 2 x 4
      accumulation, lr 1e-3 scaled by batch x accumulation x the concept's data-parallel
      replicas (8e-3 on one device), 1000 steps, checkpoints every 250, fp32, DPM-Solver++
      50 steps for validation on the reference's 4 prompts x 4 seeds.
tiny: the shipped toy-world model (builtin:toyworld, 64 px): batch 2 x 2, 200 steps, then
      a validation grid on the toy world's prompts (20 steps); about 2 minutes on 2 CPU
      cores. Give data.images and concept.super_category (one of the world's shapes, such
      as circle, star or heart).
demo: the README's main command: tiny on the bundled held-out concept "crescent" (5 photos
      of a yellow crescent, a shape the pretraining never drew; placeholder <crescent>,
      super-category circle), then draws it on prompted backgrounds:
        python -m spacetime_jax.main --config=configs/neti.py:demo --workdir=runs/crescent
      -> runs/crescent/validation/step_000200/crescent.png (rows prompts, columns seeds)
      and runs/crescent/concept/.
"""
import ml_collections

from spacetime_jax.models.builtin import ASSETS

VALIDATION_PROMPTS = ("A photo of a {}", "A photo of a {} on a beach", "App icon of {}",
                      "A painting of {} in the style of Monet")
# The toy world's captions end with the background: these test editability there.
TOYWORLD_PROMPTS = ("a photo of a {}", "a photo of a {} on a green background",
                    "a photo of a {} on a purple background",
                    "a photo of a {} on a white background")


VARIANTS = {  # get_config's variants (the default first), one line each for --help
    "sd15": "the reference's defaults: SD v1-4, 512 px, batch 2 x 4 accumulation, 1000 steps",
    "tiny": "the shipped toy-world model's settings, 200 steps, about 2 minutes on 2 CPU cores "
            "(give data.images and concept.super_category)",
    "demo": "the README's main command: tiny on the bundled crescent concept",
}


def get_config(arg: str = "sd15") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "neti"
    c.model = "CompVis/stable-diffusion-v1-4"
    c.model_revision = ""  # a hub id's branch, tag or commit; "" = its default branch
    c.compute_dtype = "float32"
    # The U-Net's attention kernel: auto (cudnn on GPUs, splash on TPUs, xla elsewhere),
    # xla, cudnn or splash (spacetime_jax/models/attention_kernels.py).
    c.attention = "auto"

    c.concept = ml_collections.ConfigDict()
    c.concept.placeholder = ""     # "" = <data.images' folder name>
    c.concept.super_category = ""  # required: one token of the model's vocabulary
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
    # Activation checkpointing of the frozen U-Net's ResNet and transformer blocks and of the
    # text encoder's layers, for batches or resolutions that do not fit: none | full | dots |
    # dots_saveable (spacetime_jax/training/remat.py). The results are the same; the memory
    # is not (benchmarks/neti_step.py measures each).
    c.train.remat_policy = "none"
    # Concepts per device whose gradients one pass of the step computes at once; the step
    # makes as many passes as it needs (the result is the same). 0: auto (2 on a CPU, where a
    # bigger working set spills the caches; all at once on GPUs and TPUs); -1: all at once.
    c.train.concepts_per_pass = 0

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

    if arg in ("tiny", "demo"):
        c.model = "builtin:toyworld"
        c.data.resolution = 64
        c.validation.prompts = TOYWORLD_PROMPTS
        c.validation.guidance_scale = 4.0
        c.train.steps = 200
        c.train.grad_accum = 2
        c.train.log_every = 20
        c.train.checkpoint_every = 50
        c.validation.every = 200
        c.validation.steps = 20
    if arg == "demo":  # the placeholder comes from the folder's name: <crescent>
        c.data.images = str(ASSETS / "concepts" / "crescent")
        c.concept.super_category = "circle"
    elif arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/neti.py ({', '.join(VARIANTS)})")
    c.lock()
    return c
