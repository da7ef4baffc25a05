"""Helpers for the PyTorch-reference tests: random weights, per-layer attention processors."""
from __future__ import annotations

import diffusers
import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturbs every parameter, so that no default init (unit norms, zero biases) hides a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.add_(noise * scale)
    return module.eval()


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def cross_attention_names_in_forward_order(unet) -> list[str]:
    """attn2 module names of a diffusers UNet2DConditionModel in forward order."""
    names = []
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(getattr(block, "attentions", []))):
            names.append(f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2")
    names.append("mid_block.attentions.0.transformer_blocks.0.attn2")
    for i, block in enumerate(unet.up_blocks):
        for j in range(len(getattr(block, "attentions", []))):
            names.append(f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2")
    return names


class PerLayerContextProcessor:
    """A diffusers attention processor that gives cross-attention layer `index` its own key
    and value contexts, read from `cross_attention_kwargs` (layer_keys / layer_values:
    tensors (num_layers, B, T, D)). This is how the NeTI reference conditions each layer."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, layer_keys=None, layer_values=None):
        key_context = layer_keys[self.index]
        value_context = layer_values[self.index]
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        k = attn.to_k(key_context)
        v = attn.to_v(value_context)
        split = lambda x: x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * out.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def install_per_layer_processors(unet) -> dict:
    """Gives every attn2 a PerLayerContextProcessor; returns the processors it replaced."""
    # The self-attention processors ignore (and would warn about) the per-layer kwargs.
    diffusers.utils.logging.set_verbosity_error()
    previous = dict(unet.attn_processors)
    processors = dict(previous)
    for index, name in enumerate(cross_attention_names_in_forward_order(unet)):
        processors[f"{name}.processor"] = PerLayerContextProcessor(index)
    unet.set_attn_processor(processors)
    return previous
