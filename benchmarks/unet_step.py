"""U-Net step time: our Flax UNet2DConditionModel against diffusers' PyTorch one.

  python benchmarks/unet_step.py --size tiny
  python benchmarks/unet_step.py --size sd15 --batch 1 --resolution 32 --steps 2 --warmup 1
  python -m benchmarks.unet_step --size sd15 --dtype bfloat16 --no-torch   # on an accelerator

Times two steps, each the median of --steps calls after --warmup untimed ones:
  forward           noise prediction for random latents, one timestep, a random (B, 77, D)
                    context (PyTorch under torch.no_grad);
  forward+backward  the gradient of sum(output**2) with respect to the context only, the
                    U-Net weights frozen (passed to jit as an argument, never closed over).
Both models carry the same random weights: the PyTorch model is built and initialized first
and its state dict converted onto our param template (--no-torch: our own random init).
PyTorch runs in float32 on the CPU with every core (--torch-threads); --dtype sets only our
compute dtype. On a CPU busy with other jobs, PyTorch with several threads can be many times
slower than with one (its threads wait on each other): compare with --torch-threads 1 there.

Also printed per step: AOT compile time (lower + compile, apart from the steps), XLA's FLOP
count, achieved FLOP/s against a matmul peak measured here in the same dtype, XLA's memory
for one call (arguments + outputs + temporaries), and how far our results are from PyTorch's.
tiny runs in seconds on 2 CPU cores; sd15 at --resolution 32 takes a few minutes there.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (compile_timed, cost_analysis_flops, device_description,
                               format_or_na, format_table, matmul_peak_flops, median,
                               memory_analysis_bytes, ratio_or_none, time_fn)
from spacetime_jax.models import convert
from spacetime_jax.models.tiny_configs import TINY_SD1_UNET
from spacetime_jax.models.unet import UNet2DConditionModel, UNetConfig

# Stable Diffusion 1.5's unet/config.json (runwayml/stable-diffusion-v1-5), written out here
# because no weights or configs can be downloaded where this runs.
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}
CONFIGS = {"tiny": TINY_SD1_UNET, "sd15": SD15_UNET}
DEFAULT_STEPS = {"tiny": 10, "sd15": 3}
CONTEXT_TOKENS = 77
TIMESTEP = 500
STEP_NAMES = ("forward", "forward+backward")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--batch", type=int, default=None,
                        help="default: 2 for tiny; 1 for sd15 on CPU, 2 on an accelerator")
    parser.add_argument("--resolution", type=int, default=None,
                        help="latent side; default: the config's sample_size")
    parser.add_argument("--steps", type=int, default=None, help="timed calls (10 tiny, 3 sd15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="our compute dtype (params stay float32; PyTorch stays float32)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                        help="PyTorch intra-op threads (default: every core); on a machine "
                             "shared with other jobs, 1 avoids threads waiting on each other")
    args = parser.parse_args(argv)
    on_cpu = jax.devices()[0].platform == "cpu"
    if args.batch is None:
        args.batch = 1 if args.size == "sd15" and on_cpu else 2
    if args.resolution is None:
        args.resolution = CONFIGS[args.size]["sample_size"]
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.size]
    return args


def random_inputs(config: UNetConfig, batch: int, resolution: int) -> dict[str, np.ndarray]:
    """Latents (NHWC), timesteps (B,) and a (B, 77, D) context, float32 normal noise."""
    rng = np.random.default_rng(0)
    return {
        "latents": rng.standard_normal((batch, resolution, resolution, config.in_channels),
                                       dtype=np.float32),
        "timesteps": np.full((batch,), TIMESTEP, np.int32),
        "context": rng.standard_normal((batch, CONTEXT_TOKENS, config.cross_attention_dim),
                                       dtype=np.float32),
    }


# --- the two steps, ours -------------------------------------------------------------------

def jax_steps(model: UNet2DConditionModel) -> dict[str, Callable]:
    """name -> f(params, latents, timesteps, context); params are an argument, not a closure
    (closed-over weights would be baked into the program as constants)."""
    def forward(params, latents, timesteps, context):
        return model.apply({"params": params}, latents, timesteps, context)

    def squared_output(params, latents, timesteps, context):
        return jnp.sum(jnp.square(forward(params, latents, timesteps, context)))

    def forward_backward(params, latents, timesteps, context):
        return jax.grad(squared_output, argnums=3)(params, latents, timesteps, context)

    return dict(zip(STEP_NAMES, (forward, forward_backward)))


def measure_jax_step(step: Callable, params: Any, inputs: dict[str, jax.Array],
                     steps: int, warmup: int) -> dict[str, Any]:
    args = (params, inputs["latents"], inputs["timesteps"], inputs["context"])
    compiled, compile_s = compile_timed(jax.jit(step), *args)
    times, output = time_fn(lambda: compiled(*args), steps=steps, warmup=warmup)
    return {"seconds": median(times), "compile_s": compile_s,
            "flops": cost_analysis_flops(compiled), "memory": memory_analysis_bytes(compiled),
            "output": np.asarray(output, np.float32)}


# --- the two steps, PyTorch ----------------------------------------------------------------

def build_torch_unet(config_dict: dict):
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    model = TorchUNet.from_config(config_dict).eval()
    model.requires_grad_(False)  # frozen weights: only the context gets a gradient
    return model


def torch_steps(model, inputs: dict[str, np.ndarray]) -> dict[str, Callable]:
    """name -> zero-argument callable returning a numpy array in our layout (NHWC)."""
    import torch

    latents = torch.from_numpy(inputs["latents"]).permute(0, 3, 1, 2).contiguous()
    timesteps = torch.from_numpy(inputs["timesteps"]).long()
    context = torch.from_numpy(inputs["context"]).clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            out = model(latents, timesteps, encoder_hidden_states=context).sample
        return out.permute(0, 2, 3, 1)

    def forward_backward():
        context.grad = None  # a fresh gradient each call, not an accumulated one
        out = model(latents, timesteps, encoder_hidden_states=context).sample
        out.square().sum().backward()
        return context.grad

    return dict(zip(STEP_NAMES, (forward, forward_backward)))


def measure_torch_step(step: Callable, steps: int, warmup: int) -> dict[str, Any]:
    times, output = time_fn(step, steps=steps, warmup=warmup, block=lambda out: out)
    return {"seconds": median(times), "output": output.detach().numpy()}


# --- weights -------------------------------------------------------------------------------

def params_from_torch(torch_model, template: Any) -> Any:
    state_dict = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    converted = convert.torch_to_flax(state_dict, template, what="U-Net")
    return jax.tree.map(jnp.asarray, converted)


def count_params(params: Any) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


# --- report --------------------------------------------------------------------------------

def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference|."""
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def step_row(name: str, ours: dict, torch_result: Optional[dict], peak: float) -> list[str]:
    torch_s = torch_result["seconds"] if torch_result else None
    achieved = ratio_or_none(ours["flops"], ours["seconds"])
    memory_mb = ratio_or_none(ours["memory"], 2 ** 20)
    return [
        name,
        f"{ours['seconds'] * 1e3:.2f}",
        format_or_na(None if torch_s is None else torch_s * 1e3, ".2f"),
        format_or_na(ratio_or_none(ours["seconds"], torch_s), ".3f"),
        f"{ours['compile_s']:.2f}",
        format_or_na(ratio_or_none(ours["flops"], 1e9), ".3f"),
        format_or_na(ratio_or_none(achieved, 1e9), ".1f"),
        format_or_na(ratio_or_none(achieved, peak / 100), ".1f"),
        format_or_na(memory_mb, ".1f"),
    ]


def print_report(args, n_params: int, peak: float, peak_side: int, ours: dict,
                 reference: Optional[dict], torch_threads: Optional[int]) -> None:
    torch_label = "skipped (--no-torch)" if reference is None else (
        f"diffusers UNet2DConditionModel, PyTorch CPU float32, {torch_threads} thread(s)")
    print(f"device (jax):  {device_description()}, jax {jax.__version__}")
    print(f"reference:     {torch_label}")
    print(f"model:         {args.size} U-Net, {n_params / 1e6:.2f} M params, "
          f"our compute dtype {args.dtype}")
    print(f"inputs:        batch {args.batch}, latents {args.resolution}x{args.resolution}, "
          f"context ({args.batch}, {CONTEXT_TOKENS}, {CONFIGS[args.size]['cross_attention_dim']})")
    print(f"timing:        median of {args.steps} calls after {args.warmup} warm-up")
    print(f"matmul peak:   {peak / 1e9:.1f} GFLOP/s ({args.dtype} {peak_side}x{peak_side}, jitted)")
    print()
    headers = ["step", "ours ms", "torch ms", "ours/torch", "compile s", "GFLOP/step",
               "GFLOP/s", "% peak", "XLA mem MB"]
    rows = [step_row(name, ours[name], reference and reference[name], peak)
            for name in STEP_NAMES]
    print(format_table(headers, rows))
    print()
    print("XLA mem: arguments (incl. params) + outputs + temporaries of one compiled call; "
          "PyTorch peak memory: n/a (not measured on CPU)")
    if reference is not None:
        for name, what in zip(STEP_NAMES, ("noise prediction", "gradient w.r.t. context")):
            diff = relative_difference(ours[name]["output"], reference[name]["output"])
            print(f"parity {name:<17} {what}: max|ours - torch| / max|torch| = {diff:.2e}")


# --- main ----------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    config = UNetConfig.from_dict(CONFIGS[args.size])
    dtype = jnp.dtype(args.dtype)
    inputs = random_inputs(config, args.batch, args.resolution)
    jax_inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
    model = UNet2DConditionModel(config, dtype=dtype)

    peak, peak_side = matmul_peak_flops(dtype=dtype)

    torch_model, torch_threads = None, None
    template = jax.eval_shape(model.init, jax.random.key(0), jax_inputs["latents"],
                              jax_inputs["timesteps"], jax_inputs["context"])["params"]
    if args.no_torch:
        params = jax.jit(model.init)(jax.random.key(0), jax_inputs["latents"],
                                     jax_inputs["timesteps"], jax_inputs["context"])["params"]
    else:
        import torch
        torch_threads = args.torch_threads
        torch.set_num_threads(torch_threads)
        torch_model = build_torch_unet(CONFIGS[args.size])
        params = params_from_torch(torch_model, template)

    ours = {name: measure_jax_step(step, params, jax_inputs, args.steps, args.warmup)
            for name, step in jax_steps(model).items()}
    reference = None
    if torch_model is not None:
        reference = {name: measure_torch_step(step, args.steps, args.warmup)
                     for name, step in torch_steps(torch_model, inputs).items()}
    print_report(args, count_params(params), peak, peak_side, ours, reference, torch_threads)


if __name__ == "__main__":
    main()
