"""ELITE stage 1: the global mapper (5 words per image) and the U-Net's K/V copies.

  python -m spacetime_jax.main --config=configs/elite_global.py --workdir=runs/elite_global \
      --config.data.root=/data/openimages   # OpenImages layout: see spacetime_jax/elite/data.py

Writes WORKDIR/encoder/ (encoder.json + global.safetensors: what stage 2 and personalization
load), WORKDIR/checkpoints/ (orbax; rerunning the same command resumes), metrics.jsonl (loss,
held-out loss) and WORKDIR/validation/step_N.png (held-out objects x prompts x seeds).

model_revision pins the hub revision of model (a branch, tag or commit; "" = the default
branch; a local folder ignores it); the encoder records it and personalization loads it.

sd15: the reference's defaults: SD v1-4, CLIP ViT-L/14 at 224 px, 512 px crops of OpenImages'
      test split, batch 16 x 4 accumulation, base lr 1e-6 per sample scaled by the global batch
      x accumulation (6.4e-5), gradient clipping 1, ~70k steps. The global batch is split over
      the mesh's `data` axis (and over processes in a multi-host run).
tiny: the shipped toy-world model (builtin:toyworld, 64 px, its own CLIP vision tower) on toy
      objects written on first use (builtin:toyworld_objects); a few minutes on 2 CPU cores.
"""
import ml_collections

VALIDATION_PROMPTS = ("a photo of a {}", "a photo of a {} on the beach",
                      "a painting of a {} in the style of Monet")
TOYWORLD_PROMPTS = ("a photo of a {}", "a photo of a {} on a green background",
                    "a photo of a {} on a purple background")


VARIANTS = {  # get_config's variants (the default first), one line each for --help
    "sd15": "the reference's defaults: SD v1-4, CLIP ViT-L/14, 512 px OpenImages crops, "
            "batch 16 x 4 accumulation, ~70k steps",
    "tiny": "the shipped toy-world model on toy objects written on first use, a few minutes "
            "on 2 CPU cores",
}


def get_config(arg: str = "sd15") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "elite"
    c.stage = "global"
    c.model = "CompVis/stable-diffusion-v1-4"
    c.model_revision = ""  # a hub id's branch, tag or commit; "" = its default branch
    # A transformers-layout CLIP vision folder or hub id; "" = the model folder's image_encoder/.
    c.image_encoder = "openai/clip-vit-large-patch14"
    c.compute_dtype = "float32"
    # The U-Net's attention kernel: auto (cudnn on GPUs, splash on TPUs, xla elsewhere),
    # xla, cudnn or splash (spacetime_jax/models/attention_kernels.py).
    c.attention = "auto"
    c.placeholder = "S"  # replaced by the words; may be an existing word
    c.global_checkpoint = ""  # stage 2 only
    c.local_scale = 1.0       # stage 2 only: lambda in training

    c.encoder = ml_collections.ConfigDict()
    c.encoder.feature_layers = (24, 4, 8, 12, 16)
    c.encoder.hidden_width = 1024

    c.data = ml_collections.ConfigDict()
    c.data.root = ""             # OpenImages-layout folder, or builtin:toyworld_objects
    c.data.split = "test"        # the reference trains on OpenImages' test split
    c.data.validation_split = "validation"
    c.data.tfds_dir = ""         # where the tfds dataset is built; "" = the user cache
    c.data.resolution = 512      # crops are stored and trained at this size
    # Stage 1's object filter, as the reference's OpenImagesDataset: boxes covering 0.02..0.8 of
    # the image, whatever their side or aspect (0 / inf: no limit), padded by 10 px (clipped to
    # the image). Stage 2 (configs/elite_local.py) filters otherwise.
    c.data.min_side = 0          # pixels of the original image, both box sides
    c.data.min_aspect = 0.0      # box width / height
    c.data.max_aspect = float("inf")
    c.data.min_area = 0.02       # box area / image area
    c.data.max_area = 0.8
    c.data.pad_min = 10          # crop padding in pixels, per object in [pad_min, pad_max]
    c.data.pad_max = 10
    c.data.max_bad_fraction = 0.01
    c.data.prefetch = 2           # batches built ahead on a background thread
    c.data.prefetch_workers = 4   # threads building one batch's rows

    c.train = ml_collections.ConfigDict()
    c.train.steps = 70000
    c.train.batch_size = 16      # global, per micro-batch
    c.train.grad_accum = 4
    c.train.learning_rate = 1e-6
    c.train.scale_lr = True      # x batch_size x grad_accum
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.weight_decay = 1e-2
    c.train.seed = 0
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.remat_policy = "none"  # none | full | dots | dots_saveable (training/remat.py)

    c.evaluation = ml_collections.ConfigDict()
    c.evaluation.num_examples = 16  # a fixed held-out batch (validation split), fixed draws
    c.evaluation.seed = 0

    c.validation = ml_collections.ConfigDict()
    c.validation.every = 5000  # 0: never
    c.validation.num_images = 4
    c.validation.prompts = VALIDATION_PROMPTS
    c.validation.seeds = (42, 43)
    c.validation.local_scales = (0.6,)  # stage 2 only
    c.validation.token_index = "0"      # "0": the primary word (the reference's scripts); "all"
    c.validation.steps = 50
    c.validation.guidance_scale = 5.0
    c.validation.sampler = "lms"

    c.mesh = ml_collections.ConfigDict({"concept": 1, "data": -1, "model": 1})
    c.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 0, "process_id": -1})

    if arg == "tiny":
        apply_tiny(c)
    elif arg != "sd15":
        raise ValueError(f"unknown variant {arg!r} of configs/elite_global.py "
                         f"({', '.join(VARIANTS)})")
    c.lock()
    return c


def apply_tiny(c: ml_collections.ConfigDict) -> None:
    """The toy-world settings shared by both stages."""
    c.model = "builtin:toyworld"
    c.image_encoder = ""
    c.encoder.feature_layers = (4, 0, 1, 2, 3)
    c.encoder.hidden_width = 128
    c.data.root = "builtin:toyworld_objects"
    c.data.split = "train"
    c.data.validation_split = "test"
    c.data.resolution = 64
    # The stage's side filter scaled from ~1024 px photos to the toy world's 128 px (stage 2:
    # 100 -> 12 px; stage 1 has none); areas and aspect ratios need no scaling. The crops keep
    # 32..48 px of scene around the object in both stages: the toy U-Net was pretrained on whole
    # scenes and cannot draw an object that fills the frame (held-out loss after 1000 steps
    # 0.043 with this context, 0.091 with the reference's tight 10..19 px scaled to 1..2).
    c.data.min_side = round(c.data.min_side * 128 / 1024)
    c.data.pad_min = 32
    c.data.pad_max = 48
    c.data.prefetch_workers = 1
    c.train.steps = 300
    c.train.batch_size = 8
    c.train.grad_accum = 1
    c.train.learning_rate = 1e-4
    c.train.scale_lr = False
    c.train.log_every = 25
    c.train.checkpoint_every = 100
    c.evaluation.num_examples = 32
    c.validation.every = 300
    c.validation.num_images = 3
    c.validation.prompts = TOYWORLD_PROMPTS
    c.validation.steps = 20
    c.validation.guidance_scale = 4.0
    c.validation.sampler = "dpmpp_2m"
    # The toy text encoder reads the object from all five words; word 0 alone carries little.
    c.validation.token_index = "all"
