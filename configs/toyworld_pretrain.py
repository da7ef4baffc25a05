"""Pretrain the project's own toy-world Stable Diffusion, in SD's order: CLIP, VAE, U-Net.

  python -m spacetime_jax.main --config=configs/toyworld_pretrain.py --workdir=runs/toyworld

Writes runs/toyworld/model/ (diffusers layout, fp16 weights: unet/ vae/ text_encoder/
tokenizer/ scheduler/, plus image_encoder/, the CLIP vision tower in transformers layout, and
pretrain_summary.json), runs/toyworld/grid.png, and each stage's folder (dataset/ clip/ vae/
unet/ with metrics.jsonl and checkpoints/). Rerun the same command after an interruption:
finished stages are skipped and the stage that was running resumes from its newest checkpoint
(every <stage>.checkpoint_every steps; SIGTERM saves one and exits 143). Run it in the
background (nohup ... > pretrain.log &) and follow the log.

full:  the shipped model, toy world v2.1 (spacetime_jax/assets/toyworld, builtin:toyworld).
       40k images; CLIP 64 wide, 4+4 layers (held-out retrieval top-1 0.947 in batches of
       64); VAE [16, 32, 64], 3 blocks (factor 4: 64x64x3 <-> 16x16x4, so that latents keep
       outlines), 4400 x 16 at 2e-3, its latents centered per channel (the means folded into
       its weights); U-Net SD 1.x topology [32, 64, 64, 64], 16 cross-attention layers
       (3.28M params) at 16x16 latents, 5600 x 32 at 2e-3, min-SNR-5 loss weighting, offset
       noise 0.1. The README's toy-world section has each stage's time and result.
v2:    the model shipped before v2.1: the same with the U-Net at 5e-4 (shapes 0.20 against
       v2.1's 0.30 at guidance 4).
v1:    the model shipped first: VAE [8, 16, 32, 32] (factor 8: 8x8 latents, held-out L1
       0.16), U-Net 4000 x 64, plain noise loss; 1h05m.
v2a:   the first v2 candidate: full without the centered latents and offset noise, 4400
       U-Net steps (backgrounds 0.50 at guidance 4: see the README).
smoke: a few hundred images and a few steps per stage at toy widths: a minute or two, mostly
       compilation; the end-to-end test runs it.

Override anything, e.g. --config.unet.steps=8000 --config.sample.guidance_scale=3.
"""
import ml_collections


VARIANTS = {  # get_config's variants (the default first), one line each for --help
    "full": "the shipped model, toy world v2.1 (builtin:toyworld): 40k images, CLIP, VAE "
            "and U-Net",
    "v2": "the model shipped before v2.1 (its U-Net at learning rate 5e-4)",
    "v1": "the model shipped first (factor-8 VAE, 8x8 latents): 1h05m",
    "v2a": "the first v2 candidate (no centered latents or offset noise, 4400 U-Net steps)",
    "smoke": "a few hundred images and a few steps per stage, a minute or two",
}


def get_config(arg: str = "full") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "toyworld_pretrain"

    c.data = ml_collections.ConfigDict()
    c.data.num_examples = 40_000
    c.data.seed = 0
    c.data.image_size = 64
    c.data.processes = 2  # rendering workers

    # Each stage checkpoints every `checkpoint_every` steps into W/<stage>/checkpoints (200:
    # about 2 min of the full run on 2 CPU cores, for every stage).

    # Stage 1: CLIP. `width` is the text tower's, and the U-Net's cross_attention_dim.
    c.clip = ml_collections.ConfigDict()
    c.clip.width = 64
    c.clip.text_layers = 4
    c.clip.heads = 4
    c.clip.vision_width = 64
    c.clip.vision_layers = 4
    c.clip.patch_size = 8
    c.clip.image_size = 64
    c.clip.projection_dim = 64
    c.clip.batch_size = 128
    # > 0: each batch is this many (object color, background color) groups, so that its
    # negatives share both colors and only shape, size and patterns tell captions apart.
    c.clip.groups_per_batch = 0
    c.clip.steps = 800
    c.clip.learning_rate = 1e-3
    c.clip.warmup_steps = 100
    c.clip.weight_decay = 0.1
    c.clip.seed = 0
    c.clip.checkpoint_every = 200

    # Stage 2: VAE (L1 + kl_weight * KL, both means; see toyworld/pretrain_vae.py). One block
    # per width, each but the last halving the side.
    c.vae = ml_collections.ConfigDict()
    # 3 widths make SD's 4 latent channels at a quarter of the image side: 16x16 latents
    # keep the outlines that v1's 8x8 (an eighth) lost.
    c.vae.channels = (16, 32, 64)
    c.vae.layers_per_block = 1
    c.vae.norm_num_groups = 8
    c.vae.batch_size = 16
    c.vae.steps = 4400
    c.vae.learning_rate = 2e-3
    c.vae.warmup_steps = 100
    c.vae.weight_decay = 0.0
    c.vae.kl_weight = 1e-6
    # Zero-mean latents (each channel's mean folded into the weights): with offset noise
    # below, the text and not the leak of SD's schedule sets the background (v2a drew most
    # backgrounds orange or red, worse at guidance 1 than at 4).
    c.vae.center_latents = True
    c.vae.seed = 0
    c.vae.checkpoint_every = 200

    # Stage 3: U-Net (attention_heads: heads per block, diffusers' `attention_head_dim`).
    c.unet = ml_collections.ConfigDict()
    c.unet.block_out_channels = (32, 64, 64, 64)
    c.unet.layers_per_block = 2
    c.unet.attention_heads = 2
    c.unet.norm_num_groups = 8
    c.unet.batch_size = 32
    c.unet.steps = 5600
    # 2e-3, not SD's 1e-4-ish: the rate the one-step denoising probe ranked first (the
    # README's U-Net trials); 4x v2's 5e-4
    c.unet.learning_rate = 2e-3
    c.unet.warmup_steps = 200
    c.unet.weight_decay = 0.01
    c.unet.ema_decay = 0.999
    c.unet.caption_dropout = 0.1
    c.unet.snr_gamma = 5.0  # min-SNR loss weighting (gamma); 0: the plain noise loss
    c.unet.noise_offset = 0.1  # per-example, per-channel noise offset's std; 0: plain noise
    c.unet.prediction_type = "epsilon"  # or "v_prediction" (SD 2's); the scheduler says which
    # > 0: training timesteps t / 1000 = sigmoid(mean + std * N(0, 1)) (SD3's logit-normal),
    # more of them mid-schedule where outlines form; 0: uniform (SD 1.x's)
    c.unet.timestep_logit_mean = 0.0
    c.unet.timestep_logit_std = 0.0
    c.unet.seed = 0
    c.unet.checkpoint_every = 200

    c.export = ml_collections.ConfigDict()
    c.export.weight_dtype = "float16"

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = ("a photo of a red star on a green background",
                        "a photo of a blue circle on a yellow background",
                        "a photo of a white heart on a purple background",
                        "a photo of a yellow square on a black background")
    c.sample.seeds = (0, 1, 2, 3)
    c.sample.num_scored = 32  # random prompts whose colors are measured from the pixels
    # held-out renders noised and denoised in one step (toyworld/denoising.py): an outline
    # score that ranks short trials
    c.sample.num_denoised = 256
    c.sample.steps = 25
    c.sample.guidance_scale = 4.0
    c.sample.sampler = "dpmpp_2m"

    if arg == "v1":
        c.vae.channels = (8, 16, 32, 32)
        c.vae.layers_per_block = 2
        c.vae.steps = 1200
        c.vae.learning_rate = 1e-3
        c.vae.center_latents = False
        c.unet.batch_size = 64
        c.unet.steps = 4000
        c.unet.learning_rate = 5e-4
        c.unet.snr_gamma = 0.0
        c.unet.noise_offset = 0.0
    elif arg == "v2":
        c.unet.learning_rate = 5e-4
    elif arg == "v2a":
        c.vae.center_latents = False
        c.unet.steps = 4400
        c.unet.learning_rate = 5e-4
        c.unet.noise_offset = 0.0
    elif arg == "smoke":
        c.data.num_examples = 384
        c.data.processes = 1
        for stage in (c.clip, c.vae, c.unet):
            stage.batch_size = 16
            stage.steps = 30
            stage.warmup_steps = 5
        c.clip.width = c.clip.vision_width = c.clip.projection_dim = 32
        c.clip.text_layers = c.clip.vision_layers = 2
        c.clip.heads = 2
        c.clip.batch_size = 32
        c.clip.learning_rate = 2e-3
        c.clip.groups_per_batch = 8  # the grouped batches' path, 4 of a color pair each
        c.vae.channels = (16, 16, 16, 16)
        c.vae.layers_per_block = 1
        c.vae.norm_num_groups = 8
        c.vae.learning_rate = 1e-3
        c.unet.block_out_channels = (16, 32, 32, 32)
        c.unet.norm_num_groups = 8
        c.unet.learning_rate = 1e-3
        c.unet.timestep_logit_std = 1.0  # the logit-normal timesteps' path
        c.sample.prompts = c.sample.prompts[:2]
        c.sample.seeds = (0, 1)
        c.sample.num_scored = 8
        c.sample.num_denoised = 8
        c.sample.steps = 4
    elif arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r} of configs/toyworld_pretrain.py "
                         f"({', '.join(VARIANTS)})")
    c.lock()
    return c
