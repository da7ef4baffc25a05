"""NeTI training step: our compiled JAX step against a PyTorch step built like the reference's.

  python benchmarks/neti_step.py --size tiny
  python benchmarks/neti_step.py --size sd15 --resolution 256 --batch 1 --steps 2 --warmup 1
  python -m benchmarks.neti_step --size sd15 --dtype bfloat16 --no-torch   # on an accelerator
  python benchmarks/neti_step.py --size tiny --time-levers all   # every lever timed too

Both sides do one optimizer step of one concept on the same frozen model and the same batch
size, with gradient accumulation 1 (the reference's runs accumulate 4 micro-batches: the
1000-step extrapolation multiplies by 4).
  ours       spacetime_jax.neti.step.train_step as the `neti` job builds it (K = 1 concept
             on one device, so no shardings; TrainState donated, frozen weights as jit
             arguments, AOT lower + compile):
             mapper at all (16 layers x B) rows, ONE text-encoder call over 16 x B rows, U-Net
             forward and backward to the mapper params, AdamW. No VAE: latents are drawn from
             latent moments cached once before training (here: random moments of the shape the
             cache holds).
  reference  PyTorch float32 on the CPU, the NeTI reference's structure: VAE encode of the
             batch's images every step, noise, then for each of the 16 layers a separate
             mapper call and text-encoder call (placeholder embedding inserted, textual
             bypass), diffusers' U-Net with a per-layer attention processor given the 16 key
             and value contexts, MSE, backward to the mapper only (U-Net, text encoder and VAE
             frozen), AdamW.
Weights: one random init (numpy, spacetime_jax.models.host_init) converted to both sides, so
both run the same model; the timing needs only the shapes. Prompts are synthetic 77-token
sequences holding the placeholder once (CLIP pads every prompt to 77 tokens).

Printed: ms/step (median of --steps after --warmup), AOT compile time, XLA's FLOP count,
achieved FLOP/s against a jitted matmul peak measured here in our dtype, peak memory, and the
time of 1000 optimizer steps x 4 micro-batches. Then the memory levers, each in a process of
its own (XLA reads its flags once per process): XLA's memory analysis (arguments, temporaries,
peak) of our step compiled under XLA:CPU's default concurrency scheduler, under the memory
scheduler this project sets (training/compiler.py), with train.remat_policy dots and full (U-Net
blocks and text-encoder layers), and with bf16 frozen weights and compute, each against the
reference's peak; --time-levers NAME,... also times those (a lever compiles from shapes alone
otherwise, so the table costs one compile per row). On a CPU busy with other jobs, PyTorch with
several threads can be many times slower than with one (its threads wait on each other):
compare with --torch-threads 1 there. On 2 shared CPU cores tiny takes 3-5 minutes (about
2 of them compiling our step); sd15 at 256 px, batch 1 about 18 minutes and 11 GB of memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import types
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import (compile_timed, cost_analysis_flops, device_description,
                               format_or_na, format_table, matmul_peak_flops, median,
                               memory_fields, memory_parts, ratio_or_none, time_fn)
from benchmarks.unet_step import SD15_UNET
from configs.neti import get_config
from spacetime_jax.data.latents import LatentMoments
from spacetime_jax.diffusion.schedules import SchedulerConfig, ddpm_schedule
from spacetime_jax.models import convert
from spacetime_jax.models.clip_text import (CLIPTextConfig, CLIPTextTransformer,
                                            clip_text_param_template)
from spacetime_jax.models.host_init import host_init, param_template
from spacetime_jax.models.tiny_configs import TINY_CLIP_TEXT, TINY_SD1_UNET, TINY_VAE
from spacetime_jax.models.unet import UNet2DConditionModel, UNetConfig
from spacetime_jax.models.vae import AutoencoderKL, VAEConfig
from spacetime_jax.neti.mapper import MapperConfig, build_mapper, init_mapper_variables
from spacetime_jax.neti.step import ConceptData, StepStatics, TrainState, train_step
from spacetime_jax.neti.train import mapper_config_from

# CLIP ViT-L/14's text tower (SD 1.x's text_encoder/config.json) and SD's VAE, written out
# because nothing can be downloaded where this runs.
SD15_CLIP_TEXT = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
CONFIGS = {"tiny": (TINY_SD1_UNET, TINY_CLIP_TEXT, TINY_VAE),
           "sd15": (SD15_UNET, SD15_CLIP_TEXT, SD15_VAE)}
DEFAULT_RESOLUTION = {"tiny": 64, "sd15": 512}
DEFAULT_STEPS = {"tiny": 10, "sd15": 3}
DEFAULT_WARMUP = {"tiny": 2, "sd15": 1}
NUM_IMAGES = 5          # concept images (the reference's example sets hold 4-6)
NUM_PROMPTS = 4         # prompt templates a step picks from
CONTEXT_TOKENS = 77
# The reference's run: 1000 optimizer steps of batch 2 x 4 accumulated micro-batches.
REFERENCE_STEPS, REFERENCE_ACCUM = 1000, 4
SEED = 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--batch", type=int, default=2, help="images per step (reference: 2)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels (default: 64 tiny, 512 sd15)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10 tiny, 3 sd15)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps before timing (2 tiny, 1 sd15)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="our compute dtype for the frozen U-Net and text encoder (the "
                             "mapper and optimizer stay float32; PyTorch stays float32)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--no-levers", action="store_true",
                        help="skip the memory levers table (one compile per lever, each in "
                             "its own process)")
    parser.add_argument("--time-levers", default="",
                        help="levers whose step is also timed (--steps after --warmup), "
                             f"comma-separated: {', '.join(LEVERS)} or all")
    parser.add_argument("--lever", default=None, help=argparse.SUPPRESS)  # a lever's child
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                        help="PyTorch intra-op threads (default: every core); on a machine "
                             "shared with other jobs, 1 avoids threads waiting on each other")
    args = parser.parse_args(argv)
    args.timed_levers = lever_names(args.time_levers, parser)
    if args.resolution is None:
        args.resolution = DEFAULT_RESOLUTION[args.size]
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.size]
    if args.warmup is None:
        args.warmup = DEFAULT_WARMUP[args.size]
    return args


# --- the frozen model and the concept (shared by both sides) --------------------------------


@dataclasses.dataclass
class FrozenModel:
    """The frozen Stable Diffusion: configs and float32 numpy params (host-drawn random init)."""
    unet_config: UNetConfig
    text_config: CLIPTextConfig
    vae_config: VAEConfig
    unet_params: Any
    text_params: Any
    vae_params: Any  # the reference's only: our step never runs the VAE


def build_frozen_model(size: str, shapes_only: bool = False) -> FrozenModel:
    """Random params on the host (numpy): a jitted linen init of the SD 1.5 U-Net would take
    many minutes to compile on a CPU. `shapes_only`: ShapeDtypeStructs instead, and no VAE
    (a step compiled, not run, needs no weights)."""
    unet_dict, text_dict, vae_dict = CONFIGS[size]
    unet_config = UNetConfig.from_dict(unet_dict)
    text_config = CLIPTextConfig.from_dict(text_dict)
    vae_config = VAEConfig.from_dict(vae_dict)
    side = unet_config.sample_size
    unet_template = param_template(
        UNet2DConditionModel(unet_config),
        jax.ShapeDtypeStruct((1, side, side, unet_config.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1, 1, unet_config.cross_attention_dim), jnp.float32))
    text_template = clip_text_param_template(text_config)
    if shapes_only:
        return FrozenModel(unet_config, text_config, vae_config, unet_params=unet_template,
                           text_params=text_template, vae_params=None)
    pixels = 8 * vae_config.downsample_factor
    vae_template = param_template(
        AutoencoderKL(vae_config),
        jax.ShapeDtypeStruct((1, pixels, pixels, vae_config.in_channels), jnp.float32))
    return FrozenModel(unet_config, text_config, vae_config,
                       unet_params=host_init(unet_template, SEED),
                       text_params=host_init(text_template, SEED + 1),
                       vae_params=host_init(vae_template, SEED + 2))


@dataclasses.dataclass
class Prompts:
    ids: np.ndarray        # (P, 77) int32
    positions: np.ndarray  # (P,) the placeholder's position in each
    placeholder_id: int


def synthetic_prompts(text_config: CLIPTextConfig) -> Prompts:
    """NUM_PROMPTS prompts of 4.. words with the placeholder in the middle: BOS, words, EOS,
    padded with EOS to 77 tokens as SD's CLIP tokenizer does. The placeholder is an ordinary
    vocabulary row: the mapper output replaces its embedding wherever it is used."""
    rng = np.random.default_rng(SEED)
    placeholder = text_config.vocab_size - 3  # below BOS and EOS, the last two ids
    ids = np.full((NUM_PROMPTS, CONTEXT_TOKENS), text_config.eos_token_id, np.int32)
    positions = np.zeros(NUM_PROMPTS, np.int32)
    for row in range(NUM_PROMPTS):
        words = rng.integers(0, placeholder, 4 + row)
        half = len(words) // 2
        tokens = [text_config.bos_token_id, *words[:half], placeholder, *words[half:],
                  text_config.eos_token_id]
        ids[row, :len(tokens)] = tokens
        positions[row] = 1 + half
    return Prompts(ids, positions, placeholder)


def neti_mapper_config(frozen: FrozenModel) -> MapperConfig:
    """The `neti` job's own mapping from configs/neti.py (the reference's defaults)."""
    model_facts = types.SimpleNamespace(
        num_cross_attention_layers=frozen.unet_config.num_cross_attention_layers,
        text_encoder=types.SimpleNamespace(config=frozen.text_config))
    return mapper_config_from(get_config("sd15"), model_facts)


def count_params(params: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


# --- ours: the production step ---------------------------------------------------------------

def adamw_settings() -> dict:
    """configs/neti.py's optimizer; lr scaled by batch 2 x accumulation 4 on one device."""
    t = get_config("sd15").train
    return dict(learning_rate=t.learning_rate * t.batch_size * t.grad_accum, b1=t.adam_b1,
                b2=t.adam_b2, eps=t.adam_eps, weight_decay=t.weight_decay)


def step_statics(frozen: FrozenModel, mapper: Any, mapper_config: MapperConfig, batch: int,
                 dtype: Any, grad_accum: int = 1) -> StepStatics:
    """What the job's step closes over, for `grad_accum` micro-batches per optimizer step."""
    schedule_config = SchedulerConfig()
    return StepStatics(
        unet=UNet2DConditionModel(frozen.unet_config, dtype=dtype),
        text_encoder=CLIPTextTransformer(frozen.text_config, dtype=dtype), mapper=mapper,
        mapper_config=mapper_config, prediction_type=schedule_config.prediction_type,
        scaling_factor=frozen.vae_config.scaling_factor, batch_size=batch,
        grad_accum=grad_accum,
        num_train_timesteps=schedule_config.num_train_timesteps)


def concept_data(frozen: FrozenModel, prompts: Prompts, encoding: dict, target_norm: float,
                 resolution: int, num_concepts: int = 1) -> ConceptData:
    """`num_concepts` concepts (K; default one) as the job stacks them, each with its own
    seed; latent moments are random, of the shape the cache holds (each image and its flip)."""
    k, rows = num_concepts, 2 * NUM_IMAGES
    side = resolution // frozen.vae_config.downsample_factor
    shape = (k, rows, side, side, frozen.vae_config.latent_channels)
    rng = np.random.default_rng(SEED)
    moments = LatentMoments(mean=rng.standard_normal(shape).astype(np.float32),
                            logvar=np.full(shape, -2.0, np.float32))
    stack = lambda x: np.repeat(np.asarray(x)[None], k, axis=0)
    data = ConceptData(moments=moments, num_rows=np.full((k,), rows, np.int32),
                       prompt_ids=stack(prompts.ids), positions=stack(prompts.positions),
                       target_norms=np.full((k,), target_norm, np.float32),
                       seeds=(SEED + np.arange(k)).astype(np.uint32),
                       encoding=jax.tree.map(stack, encoding))
    return jax.tree.map(jnp.asarray, data)


def measure_ours(statics: StepStatics, params: Any, data: ConceptData, frozen_params: Any,
                 steps: int, warmup: int) -> dict[str, Any]:
    """The job's step: jit with the state donated, frozen weights as arguments, AOT compile."""
    optimizer = optax.adamw(**adamw_settings())
    state = TrainState(step=jnp.int32(0), params=params,
                       opt_state=jax.vmap(optimizer.init)(params))
    schedule = ddpm_schedule(SchedulerConfig())
    step_fn = jax.jit(functools.partial(train_step, optimizer=optimizer, statics=statics),
                      donate_argnums=(0,))
    compiled, compile_s = compile_timed(step_fn, state, data, frozen_params, schedule)
    carry = {"state": state}  # each step consumes (donates) the state the previous one made

    def one_step():
        carry["state"], losses = compiled(carry["state"], data, frozen_params, schedule)
        return losses

    times, losses = time_fn(one_step, steps=steps, warmup=warmup)
    return {"seconds": median(times), "compile_s": compile_s,
            "flops": cost_analysis_flops(compiled), **memory_fields(compiled),
            "memory_parts": memory_parts(compiled), "loss": float(np.mean(losses))}


# --- the reference's structure, PyTorch --------------------------------------------------------

@dataclasses.dataclass
class TorchReference:
    unet: Any
    text_encoder: Any
    vae: Any
    mapper: Any          # torch.nn.Module with input_layer, net, output_layer
    frequencies: Any     # W (F, 2), fixed
    optimizer: Any
    scheduler: Any
    images: Any          # (NUM_IMAGES, 3, R, R) in [-1, 1]
    prompt_ids: Any
    positions: Any
    target_norm: float
    scaling_factor: float


def _load_frozen(module, params: Any, prefix: str = ""):
    import torch

    state = convert.flax_to_torch(params, prefix=prefix)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return module.requires_grad_(False).eval()


def build_torch_mapper(params: Any, config: MapperConfig):
    """The reference mapper's layers, named as its state dict (net.0 is the input layer there;
    here it is kept apart so that each weight has one name), loaded with our initial params."""
    import torch
    from torch import nn

    from spacetime_jax.neti.mapper import LAYER_NORM_EPS, LEAKY_RELU_SLOPE

    width = config.hidden_width
    mapper = nn.Module()
    mapper.input_layer = nn.Linear(2 * config.num_frequencies, config.num_anchors)
    mapper.net = nn.Sequential(
        nn.Identity(), nn.Linear(config.num_anchors, width), nn.LayerNorm(width, LAYER_NORM_EPS),
        nn.LeakyReLU(LEAKY_RELU_SLOPE), nn.Linear(width, width),
        nn.LayerNorm(width, LAYER_NORM_EPS), nn.LeakyReLU(LEAKY_RELU_SLOPE))
    mapper.output_layer = nn.Sequential(nn.Linear(width, config.output_dim))
    state = convert.flax_to_torch(params)  # read-only views of jax arrays: copied
    mapper.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    return mapper.train()


def torch_mapper_forward(ref: TorchReference, timesteps, layers, config: MapperConfig):
    """One layer's mapper call, as the reference makes it inside its text encoder: Fourier
    features, MLP, nested dropout (one coin for the call), normalize to the target norm."""
    import torch
    import torch.nn.functional as F

    w = ref.frequencies
    angles = timesteps[:, None] * w[:, 0] + layers[:, None] * w[:, 1]
    features = torch.cat([angles.sin(), angles.cos()], dim=-1) / w.shape[0] ** 0.5
    hidden = ref.mapper.net(ref.mapper.input_layer(features))
    if config.nested_dropout and torch.rand(()) < config.nested_dropout_prob:
        keep = torch.randint(0, config.hidden_width, (hidden.shape[0],))
        hidden = hidden * (torch.arange(config.hidden_width)[None] < keep[:, None])
    return F.normalize(ref.mapper.output_layer(hidden), dim=-1) * ref.target_norm


def build_torch_reference(frozen: FrozenModel, variables: dict, config: MapperConfig,
                          prompts: Prompts, target_norm: float, resolution: int) -> TorchReference:
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import DDPMScheduler
    from diffusers import UNet2DConditionModel as TorchUNet
    from transformers import CLIPTextConfig as TorchCLIPTextConfig
    from transformers import CLIPTextModel

    from tests.torch_reference import install_per_layer_processors

    torch.manual_seed(SEED)
    unet = _load_frozen(TorchUNet.from_config(frozen.unet_config.to_dict()), frozen.unet_params)
    install_per_layer_processors(unet)
    text_encoder = _load_frozen(
        CLIPTextModel(TorchCLIPTextConfig(**frozen.text_config.to_dict())), frozen.text_params)
    vae = _load_frozen(TorchVAE.from_config(frozen.vae_config.to_dict()), frozen.vae_params)
    mapper = build_torch_mapper(variables["params"], config)
    settings = adamw_settings()
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=settings["learning_rate"],
                                  betas=(settings["b1"], settings["b2"]), eps=settings["eps"],
                                  weight_decay=settings["weight_decay"])
    return TorchReference(
        unet=unet, text_encoder=text_encoder, vae=vae, mapper=mapper,
        frequencies=torch.tensor(np.asarray(variables["encoding"]["W"])),
        optimizer=optimizer,
        scheduler=DDPMScheduler.from_config(SchedulerConfig().to_dict()),
        images=torch.rand(NUM_IMAGES, 3, resolution, resolution) * 2 - 1,
        prompt_ids=torch.from_numpy(prompts.ids).long(),
        positions=torch.from_numpy(prompts.positions).long(),
        target_norm=target_norm, scaling_factor=frozen.vae_config.scaling_factor)


def reference_step(ref: TorchReference, batch: int, config: MapperConfig) -> float:
    """One optimizer step with the reference's structure; returns the loss."""
    import torch
    import torch.nn.functional as F

    from tests.test_neti_conditioning import torch_neti_text_encoder

    rows = torch.randint(0, ref.images.shape[0], (batch,))
    with torch.no_grad():  # the VAE, every step
        latents = ref.vae.encode(ref.images[rows]).latent_dist.sample() * ref.scaling_factor
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, ref.scheduler.config.num_train_timesteps, (batch,))
    noisy = ref.scheduler.add_noise(latents, noise, timesteps)
    pick = torch.randint(0, ref.prompt_ids.shape[0], (batch,))
    ids, positions = ref.prompt_ids[pick], ref.positions[pick]
    keys, values = [], []
    for layer in range(config.num_layers):  # a mapper call and a text-encoder call per layer
        out = torch_mapper_forward(ref, timesteps.float(), torch.full((batch,), float(layer)),
                                   config)
        layer_keys, layer_values = torch_neti_text_encoder(
            ref.text_encoder, ids, positions, out[:, :config.token_dim],
            out[:, config.token_dim:])
        keys.append(layer_keys)
        values.append(layer_values)
    prediction = ref.unet(noisy, timesteps, encoder_hidden_states=keys[0],
                          cross_attention_kwargs={"layer_keys": torch.stack(keys),
                                                  "layer_values": torch.stack(values)}).sample
    loss = F.mse_loss(prediction, noise)
    ref.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ref.optimizer.step()
    return loss.item()


def torch_weight_bytes(ref: TorchReference) -> int:
    modules = (ref.unet, ref.text_encoder, ref.vae, ref.mapper)
    return sum(t.numel() * t.element_size() for m in modules
               for t in [*m.parameters(), *m.buffers()])


# --- peak resident memory of the process (Linux) -----------------------------------------------

def reset_peak_rss() -> bool:
    """Resets the process's peak resident size (VmHWM); False where the kernel does not let us."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure_reference(ref: TorchReference, batch: int, config: MapperConfig, steps: int,
                      warmup: int) -> dict[str, Any]:
    """Times the reference steps; its memory is the models' weights plus how far the process's
    peak resident size rose above its resident size during the warm-up and timed steps
    (activations, gradients, AdamW state, allocator slack)."""
    peak_resettable = reset_peak_rss()
    resident_before = status_bytes("VmRSS")
    times, loss = time_fn(lambda: reference_step(ref, batch, config), steps=steps,
                          warmup=warmup, block=lambda out: out)
    rise = status_bytes("VmHWM") - resident_before if peak_resettable else None
    weights = torch_weight_bytes(ref)
    return {"seconds": median(times), "loss": loss, "weights": weights, "rise": rise,
            "memory": None if rise is None else weights + rise}


# --- memory levers: each compiled in its own process ---------------------------------------------

# What each lever changes in the job's step. XLA reads XLA_FLAGS once per process, so the
# XLA:CPU scheduler row needs a process of its own; every row gets one, alike.
LEVERS = {  # short name (for --time-levers): (row, what it changes)
    "concurrency": ("XLA:CPU's default scheduler (concurrency)", {"scheduler": "concurrency"}),
    "memory": ("memory scheduler (ours, the default)", {}),
    "dots": ("+ remat dots (train.remat_policy)", {"remat": "dots"}),
    "full": ("+ remat full", {"remat": "full"}),
    "bf16": ("+ bf16 frozen weights and compute", {"dtype": "bfloat16"}),
}
CPU_ONLY_LEVERS = ("concurrency",)
LEVER_MARK = "LEVER_RESULT "


def lever_names(text: str, parser: argparse.ArgumentParser) -> set[str]:
    """--time-levers' names ("all": every lever); an unknown one ends the run before any
    work."""
    names = set(LEVERS) if text == "all" else set(filter(None, text.split(",")))
    if names - set(LEVERS):
        parser.error(f"--time-levers: unknown {', '.join(sorted(names - set(LEVERS)))}; use "
                     f"{', '.join(LEVERS)} or all")
    return names


def abstract(tree: Any, dtype: Any = None) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), tree)


def lever_child(args: argparse.Namespace) -> None:
    """One lever's step: compiled (from shapes alone unless timed), its XLA memory printed
    as one JSON line."""
    import json

    _, lever = LEVERS[args.lever]
    timed = bool(args.time_levers)  # the parent passes it to the levers it times
    dtype = jnp.dtype(lever.get("dtype", args.dtype))
    frozen = build_frozen_model(args.size, shapes_only=not timed)
    mapper_config = neti_mapper_config(frozen)
    mapper = build_mapper("neti", mapper_config)
    variables = init_mapper_variables(mapper, SEED)
    prompts = synthetic_prompts(frozen.text_config)
    statics = step_statics(frozen, mapper, mapper_config, args.batch, dtype)
    remat = lever.get("remat", "none")  # as train.remat_policy: U-Net and text encoder
    statics = dataclasses.replace(statics, unet=statics.unet.clone(remat_policy=remat),
                                  text_encoder=statics.text_encoder.clone(remat_policy=remat))
    data = concept_data(frozen, prompts, {k: v for k, v in variables.items() if k != "params"},
                        20.0, args.resolution)
    params = jax.tree.map(lambda x: jnp.asarray(x)[None], variables["params"])
    optimizer = optax.adamw(**adamw_settings())
    state = TrainState(step=jnp.int32(0), params=params,
                       opt_state=jax.vmap(optimizer.init)(params))
    if timed:
        frozen_params = jax.tree.map(lambda x: jnp.asarray(x, dtype),
                                     (frozen.unet_params, frozen.text_params))
        result = measure_ours(statics, params, data, frozen_params, args.steps, args.warmup)
    else:
        step_fn = jax.jit(functools.partial(train_step, optimizer=optimizer, statics=statics),
                          donate_argnums=(0,))
        frozen_shapes = abstract((frozen.unet_params, frozen.text_params), dtype)
        compiled, compile_s = compile_timed(step_fn, state, data, frozen_shapes,
                                            ddpm_schedule(SchedulerConfig()))
        result = {"seconds": None, "compile_s": compile_s, **memory_fields(compiled)}
    print(LEVER_MARK + json.dumps({key: result[key] for key in (
        "seconds", "compile_s", "memory", "arguments", "temporaries")}), flush=True)


def measure_levers(args: argparse.Namespace) -> list[tuple[str, Optional[dict]]]:
    """Each lever's step in a child process (`--lever NAME`); (name, result or None)."""
    import json
    import re
    import subprocess

    from spacetime_jax.training.compiler import SCHEDULER_FLAG

    timed = args.timed_levers
    results = []
    for short, (name, lever) in LEVERS.items():
        if short in CPU_ONLY_LEVERS and jax.default_backend() != "cpu":
            continue
        env = dict(os.environ)
        flags = re.sub(rf"{SCHEDULER_FLAG}=\S+", "", env.get("XLA_FLAGS", ""))
        if lever.get("scheduler") == "concurrency":
            flags += f" {SCHEDULER_FLAG}=true"
        env["XLA_FLAGS"] = flags.strip()
        command = [sys.executable, "-m", "benchmarks.neti_step", "--lever", short,
                   "--size", args.size, "--resolution", str(args.resolution),
                   "--batch", str(args.batch), "--dtype", args.dtype,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if short in timed:
            command += ["--time-levers", short]
        print(f"lever: {name}", flush=True)
        run = subprocess.run(command, env=env, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])
        lines = [line for line in run.stdout.splitlines() if line.startswith(LEVER_MARK)]
        if run.returncode or not lines:
            print(f"  failed (exit {run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
            results.append((name, None))
        else:
            results.append((name, json.loads(lines[-1][len(LEVER_MARK):])))
    return results


def print_levers(levers: list[tuple[str, Optional[dict]]], reference: Optional[dict]) -> None:
    mb = lambda n: format_or_na(ratio_or_none(n, 2**20), ",.0f")
    reference_memory = reference and reference["memory"]
    rows = []
    for name, result in levers:
        if result is None:
            rows.append([name] + ["failed"] * 5)
            continue
        seconds = result["seconds"]
        rows.append([name, mb(result["arguments"]), mb(result["temporaries"]),
                     mb(result["memory"]),
                     format_or_na(ratio_or_none(result["memory"], reference_memory), ".2f"),
                     format_or_na(seconds and seconds * 1e3, ".1f")])
    print("memory levers (XLA memory_analysis of the compiled step, each in its own process;"
          " ms/step where --time-levers ran it):")
    print(format_table(["lever", "arguments MB", "temporaries MB", "peak MB",
                        "/ reference", "ms/step"], rows))


# --- report -----------------------------------------------------------------------------------

def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "n/a"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def result_row(name: str, result: Optional[dict], peak: float) -> list[str]:
    if result is None:
        return [name] + ["skipped"] * 7
    seconds, flops = result["seconds"], result.get("flops")
    achieved = ratio_or_none(flops, seconds)
    compile_s = result.get("compile_s")
    return [
        name,
        f"{seconds * 1e3:.1f}",
        format_or_na(compile_s, ".1f"),
        format_or_na(ratio_or_none(flops, 1e9), ".2f"),
        format_or_na(ratio_or_none(achieved, 1e9), ".1f"),
        format_or_na(ratio_or_none(achieved, peak / 100), ".1f"),
        format_or_na(ratio_or_none(result["memory"], 2**20), ".1f"),
        format_duration(seconds * REFERENCE_STEPS * REFERENCE_ACCUM),
    ]


def print_report(args, frozen: FrozenModel, mapper_params: int, mapper_config: MapperConfig,
                 peak: float, peak_side: int, ours: dict, reference: Optional[dict]) -> None:
    millions = lambda tree: f"{count_params(tree) / 1e6:.2f} M"
    torch_label = "skipped (--no-torch)"
    if reference is not None:
        import torch
        torch_label = (f"PyTorch {torch.__version__} CPU float32, {args.torch_threads} "
                       "thread(s); diffusers U-Net with per-layer processors, transformers "
                       "CLIPTextModel, diffusers AutoencoderKL")
    side = args.resolution // frozen.vae_config.downsample_factor
    print(f"device (jax):  {device_description()}, jax {jax.__version__}")
    print(f"reference:     {torch_label}")
    print(f"model:         {args.size}: U-Net {millions(frozen.unet_params)}, text encoder "
          f"{millions(frozen.text_params)}, VAE {millions(frozen.vae_params)} (reference "
          f"only); mapper {mapper_params:,} trainable params")
    print(f"step:          batch {args.batch}, {args.resolution} px images -> {side}x{side} "
          f"latents, {mapper_config.num_layers} layers x {CONTEXT_TOKENS} tokens, grad "
          f"accumulation 1, K=1 concept; our compute dtype {args.dtype} (mapper, optimizer "
          "float32)")
    print(f"timing:        median of {args.steps} steps after {args.warmup} warm-up")
    print(f"matmul peak:   {peak / 1e9:.1f} GFLOP/s ({args.dtype} {peak_side}x{peak_side}, "
          "jitted)")
    print()
    headers = ["step", "ms/step", "compile s", "GFLOP/step", "GFLOP/s", "% peak",
               "peak mem MB", f"{REFERENCE_STEPS}x{REFERENCE_ACCUM} steps"]
    rows = [result_row("ours (JAX, one compiled step)", ours, peak),
            result_row("reference (PyTorch)", reference, peak)]
    print(format_table(headers, rows))
    print()
    ratio = ratio_or_none(ours["seconds"], reference and reference["seconds"])
    print(f"ratio (ours/reference): {format_or_na(ratio, '.3f')}")
    print()
    print(f"ours mem:      XLA memory_analysis of the compiled step: "
          f"{ours['memory_parts'] or 'n/a'} (arguments: frozen U-Net + text encoder, "
          "concept data, train state)")
    if reference is not None:
        mb = lambda n: format_or_na(ratio_or_none(n, 2**20), ".1f")
        print(f"reference mem: parameters + buffers of U-Net, text encoder, VAE and mapper "
              f"{mb(reference['weights'])} MB + rise of the process's peak resident size "
              f"(VmHWM, reset before the steps) over its resident size before them "
              f"{mb(reference['rise'])} MB")
        print(f"loss (sanity, different random draws): ours {ours['loss']:.4f}, reference "
              f"{reference['loss']:.4f}")
    else:
        print(f"loss (sanity): ours {ours['loss']:.4f}")
    per_run = "the reference's run" if args.batch == 2 else f"at batch {args.batch}"
    print(f"{REFERENCE_STEPS}x{REFERENCE_ACCUM} steps: ms/step x {REFERENCE_ACCUM} micro-batches "
          f"x {REFERENCE_STEPS} optimizer steps ({per_run}); no compile, checkpoint or "
          "validation time included")


# --- main ---------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.lever:
        lever_child(args)
        return
    dtype = jnp.dtype(args.dtype)
    peak, peak_side = matmul_peak_flops(dtype=dtype)

    # The frozen model and the concept, shared by both sides.
    frozen = build_frozen_model(args.size)
    mapper_config = neti_mapper_config(frozen)
    mapper = build_mapper("neti", mapper_config)
    variables = init_mapper_variables(mapper, SEED)
    prompts = synthetic_prompts(frozen.text_config)
    embedding = frozen.text_params["embeddings"]["token_embedding"]["embedding"]
    target_norm = float(np.linalg.norm(embedding[prompts.placeholder_id]))
    del embedding

    # PyTorch first: it copies the numpy weights, which are then dropped (SD 1.5 is 4 GB).
    reference_model = None
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.torch_threads)
        reference_model = build_torch_reference(frozen, variables, mapper_config, prompts,
                                                target_norm, args.resolution)

    # Ours: frozen weights in the compute dtype (they get no gradient), as the loader does.
    to_device = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
    frozen_params = (to_device(frozen.unet_params), to_device(frozen.text_params))
    statics = step_statics(frozen, mapper, mapper_config, args.batch, dtype)
    data = concept_data(frozen, prompts, {k: v for k, v in variables.items() if k != "params"},
                        target_norm, args.resolution)
    params = jax.tree.map(lambda x: jnp.asarray(x)[None], variables["params"])
    report_model = dataclasses.replace(
        frozen, **{name: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                      getattr(frozen, name))
                   for name in ("unet_params", "text_params", "vae_params")})
    del frozen  # only the device arrays and the PyTorch copies stay

    ours = measure_ours(statics, params, data, frozen_params, args.steps, args.warmup)
    print(f"ours: compiled in {ours['compile_s']:.1f} s, {ours['seconds'] * 1e3:.1f} ms/step",
          flush=True)
    reference = None
    if reference_model is not None:
        print(f"timing the PyTorch reference ({args.warmup} + {args.steps} steps)", flush=True)
        reference = measure_reference(reference_model, args.batch, mapper_config, args.steps,
                                      args.warmup)
    print_report(args, report_model, count_params(variables["params"]), mapper_config, peak,
                 peak_side, ours, reference)
    if not args.no_levers:
        del frozen_params, data, params  # the children need the memory
        print()
        print_levers(measure_levers(args), reference)


if __name__ == "__main__":
    main()
