"""Text-to-image sampling from a plain Stable Diffusion (no concept): a PNG grid.

  python -m spacetime_jax.main --config=configs/sample.py:tiny --workdir=runs/sample

tiny: the shipped toy-world model (builtin:toyworld, 64 px), 4 prompts in the world's words x
      4 seeds, 25 DPM-Solver++ steps, guidance 4; under a minute on 2 CPU cores (mostly
      compilation); writes runs/sample/grid.png (rows prompts, columns seeds) and one PNG per
      image. --config.model=builtin:tiny-random samples the random model (noise: a path check).
sd15: SD 1.5 from a local diffusers folder or the hub id (stable-diffusion-v1-5/
      stable-diffusion-v1-5, the maintained copy of runwayml's), 512 px, 50 DPM-Solver++
      steps, guidance 7.5, the NeTI validation seeds.
neti: a trained NeTI concept on its own base model (and the revision it was trained on): the
      reference's validation prompts ("{}" is the concept) x truncation indices (untruncated,
      8, 16, 32, 64), seed 42, guidance 7.5, 50 steps; for a concept of a real SD:
      python -m spacetime_jax.main --config=configs/sample.py:neti --workdir=runs/cat/samples \
          --config.concept=runs/cat/concept --config.sample.truncations='(4, 32)'
      writes grid_seed42.png (rows prompts, columns truncation) and one PNG per image.
neti_tiny: neti for a concept of the toy-world model (configs/neti.py:tiny or :demo): prompts
      in the world's words (backgrounds it knows, not the reference's beach or Monet), 25
      steps, guidance 4:
      python -m spacetime_jax.main --config=configs/sample.py:neti_tiny \
          --workdir=runs/crescent/samples --config.concept=runs/crescent/concept

model_revision pins a hub id's revision (a branch, tag or commit; "" = the default branch, or
for a concept with model "" the revision it was trained on); a local folder ignores it.
Override anything: --config.model=/path/to/sd --config.sample.prompts='("a red car",)'
"""
import ml_collections


VARIANTS = {  # get_config's variants (the default first), one line each for --help
    "sd15": "SD 1.5 (a local diffusers folder or the hub id), 512 px, 50 DPM-Solver++ steps",
    "tiny": "the shipped toy-world model: 4 prompts x 4 seeds, 25 steps, under a minute on "
            "2 CPU cores",
    "neti": "a trained NeTI concept (--config.concept=WORKDIR/concept): prompts x "
            "nested-dropout truncations, seed 42",
    "neti_tiny": "neti for a concept of the toy-world model: prompts in the world's words, "
                 "25 steps, guidance 4",
}


def get_config(arg: str = "sd15") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "sample"
    c.model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    c.model_revision = ""  # a hub id's branch, tag or commit; "" = its default branch
    c.compute_dtype = "float32"
    # The U-Net's attention kernel: auto (cudnn on GPUs, splash on TPUs, xla elsewhere),
    # xla, cudnn or splash (spacetime_jax/models/attention_kernels.py).
    c.attention = "auto"
    # A NeTI concept folder (WORKDIR/concept of a training run): prompts then hold "{}" for
    # the concept, and each seed gets a grid of prompts x truncation indices.
    c.concept = ""
    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = ("A photo of a cat", "A painting of a dog in the style of Monet")
    c.sample.seeds = (42, 420, 501, 5456)
    c.sample.steps = 50
    c.sample.guidance_scale = 7.5
    c.sample.sampler = "dpmpp_2m"
    c.sample.resolution = 0  # 0: the model's own (U-Net sample_size x VAE factor)
    # Nested-dropout truncation indices, one column each after the untruncated one: a
    # smaller index is more editable, less faithful (0..hidden_width).
    c.sample.truncations = (8, 16, 32, 64)
    if arg == "tiny":
        c.model = "builtin:toyworld"
        c.sample.prompts = ("a photo of a red star on a green background",
                            "a photo of a large blue circle on a yellow background",
                            "a photo of a white striped heart on a purple background",
                            "a photo of a small yellow triangle on a black background")
        c.sample.seeds = (0, 1, 2, 3)
        c.sample.steps = 25
        c.sample.guidance_scale = 4.0
    elif arg == "neti":
        c.model = ""  # the concept's own base model
        c.sample.prompts = ("A photo of a {}", "A photo of a {} on a beach", "App icon of {}",
                            "A painting of {} in the style of Monet")
        c.sample.seeds = (42,)
    elif arg == "neti_tiny":
        c.model = ""
        c.sample.prompts = ("a photo of a {}", "a photo of a {} on a blue background",
                            "a photo of a {} on a yellow checkered background",
                            "a photo of a large {} on a black background")
        c.sample.seeds = (42,)
        c.sample.steps = 25
        c.sample.guidance_scale = 4.0
    elif arg != "sd15":
        raise ValueError(f"unknown variant {arg!r} of configs/sample.py ({', '.join(VARIANTS)})")
    c.lock()
    return c
