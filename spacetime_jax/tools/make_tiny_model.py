"""Write a complete, random-init Stable Diffusion folder in diffusers layout, at toy widths.

    python -m spacetime_jax.tools.make_tiny_model OUT [--style sd1|sd2] [--seed 0] [--vision]

The folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, and with
--vision a transformers-layout image_encoder/) loads in this project and in diffusers /
transformers alike. Tests build their models with it; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp

from spacetime_jax.diffusion.schedules import SchedulerConfig
from spacetime_jax.models import tiny_configs
from spacetime_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from spacetime_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTransformer
from spacetime_jax.models.host_init import host_init, param_template
from spacetime_jax.models.pretrained import save_clip_vision, save_stable_diffusion
from spacetime_jax.models.tokenizer import build_clip_tokenizer_files
from spacetime_jax.models.unet import UNet2DConditionModel, UNetConfig
from spacetime_jax.models.vae import AutoencoderKL, VAEConfig

# Whole-word tokens for the words tests and demos use; anything else splits into characters.
TINY_WORDS = ("a photo of the an on in with painting style rendering cat dog toy object red "
              "green blue yellow background star circle square beach icon app monet").split()
STYLES = {
    "sd1": (tiny_configs.TINY_SD1_UNET, tiny_configs.TINY_CLIP_TEXT),
    "sd2": (tiny_configs.TINY_SD2_UNET, tiny_configs.TINY_CLIP_TEXT_SD2),
}


def random_params(module, seed: int, *example_inputs) -> dict:
    return host_init(param_template(module, *example_inputs), seed)


def make_tiny_model(out_dir: str | Path, style: str = "sd1", seed: int = 0,
                    vision: bool = False) -> Path:
    unet_dict, text_dict = STYLES[style]
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        info = build_clip_tokenizer_files(TINY_WORDS, tmp)
        text_config = CLIPTextConfig.from_dict(dict(
            text_dict, vocab_size=info.vocab_size, bos_token_id=info.bos_token_id,
            eos_token_id=info.eos_token_id, pad_token_id=info.pad_token_id))
        unet_config = UNetConfig.from_dict(unet_dict)
        vae_config = VAEConfig.from_dict(tiny_configs.TINY_VAE)
        side = unet_config.sample_size
        latents = jnp.zeros((1, side, side, unet_config.in_channels))
        context = jnp.zeros((1, 77, unet_config.cross_attention_dim))
        pixels = 8 * vae_config.downsample_factor
        image = jnp.zeros((1, pixels, pixels, vae_config.in_channels))
        save_stable_diffusion(
            out,
            unet_config=unet_config,
            unet_params=random_params(UNet2DConditionModel(unet_config), seed, latents,
                                      jnp.zeros((1,)), context),
            vae_config=vae_config,
            vae_params=random_params(AutoencoderKL(vae_config), seed + 1, image),
            text_config=text_config,
            text_params=random_params(CLIPTextTransformer(text_config), seed + 2,
                                      jnp.zeros((1, 77), jnp.int32)),
            tokenizer_dir=tmp,
            scheduler_config=SchedulerConfig(),
        )
    if vision:
        vision_config = CLIPVisionConfig.from_dict(tiny_configs.TINY_CLIP_VISION)
        pixels = jnp.zeros((1, vision_config.image_size, vision_config.image_size, 3))
        save_clip_vision(out / "image_encoder", vision_config,
                         random_params(CLIPVisionTransformer(vision_config), seed + 3, pixels))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (created)")
    parser.add_argument("--style", choices=sorted(STYLES), default="sd1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision", action="store_true", help="also write image_encoder/")
    args = parser.parse_args(argv)
    out = make_tiny_model(args.out, args.style, args.seed, args.vision)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
