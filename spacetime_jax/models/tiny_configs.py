"""Tiny configs that keep the real architectures' topology at toy widths.

TINY_SD1_UNET keeps SD 1.x's layout (4 down blocks, 3 with cross-attention, 2 layers per
block, a mid block, 3 cross-attention up blocks of 3 layers: 16 cross-attention layers).
TINY_SD2_UNET adds SD 2.x's linear projections, per-block head counts and upcast attention.
"""
TINY_SD1_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,
    "use_linear_projection": False,
    "upcast_attention": False,
}

TINY_SD2_UNET = dict(
    TINY_SD1_UNET,
    block_out_channels=[32, 64, 96, 96],
    cross_attention_dim=48,
    attention_head_dim=[2, 4, 4, 6],
    use_linear_projection=True,
    upcast_attention=True,
)

# SD's VAE topology (4 blocks, 2 layers per block, 8x downsampling, 4 latent channels) at toy
# widths: the toy world's 64x64 RGB images -> 8x8x4 latents.
TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 32, 32],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}

# CLIP text encoders in transformers' config.json format. Widths equal the tiny U-Nets'
# cross_attention_dim (32 for SD 1.x, 48 for SD 2.x); SD 2.x's OpenCLIP uses exact GELU.
# bos/eos are the last two ids, as in CLIP's real vocabulary (a tiny tokenizer must agree).
TINY_CLIP_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 37,
    "projection_dim": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 998,
    "eos_token_id": 999,
}

TINY_CLIP_TEXT_SD2 = dict(TINY_CLIP_TEXT, hidden_size=48, intermediate_size=64,
                          projection_dim=24, hidden_act="gelu")

# CLIP vision tower in transformers' CLIPVisionModel config.json format (ELITE's encoder).
TINY_CLIP_VISION = {
    "architectures": ["CLIPVisionModel"],
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 37,
    "projection_dim": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_channels": 3,
    "image_size": 32,
    "patch_size": 8,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
