"""ELITE: encoding time per image against NeTI's training time per concept, and ELITE's
training steps.

  python benchmarks/elite.py --size tiny
  python benchmarks/elite.py --size sd15 --resolution 64 --batch 1 --steps 2 --warmup 1
  python -m benchmarks.elite --size sd15 --batch 16          # on an accelerator

One run measures, on one frozen model:
  (1) ELITE's encoding: one encoder pass (CLIP vision features + the global mapper, and + the
      local mapper: a second vision pass over the masked object) as `encode_images` runs it:
      the image/mask preprocessing, then the jitted encoder (AOT compiled apart), per image at
      each --encode-batches size;
  (2) NeTI's training time per concept, an estimate: the median NeTI step (built as
      benchmarks/neti_step.py builds the `neti` job's step; batch 2 as configs/neti.py) x the
      config's micro-batches per step x its steps (tiny: 200 x 2, sd15: 1000 x 4), against
      ELITE's per-concept cost, one encoding of the concept's image;
  (3) ELITE's training steps: stage 1 (global mapper + K/V copies) and stage 2 (local mapper +
      local K/V, on a random stage-1 encoder written to a temporary folder), each the step the
      `elite` job compiles (build_session, one micro-batch of --batch rows), with XLA's FLOPs
      and memory for one call.
Sizes: tiny = the shipped toy-world model (builtin:toyworld and its image_encoder, real
weights); sd15 = SD 1.5's U-Net (with the local branch), CLIP-L text encoder, SD's VAE and
CLIP ViT-L/14 vision, all random (host-drawn) weights: the timing needs only the shapes.
Encoder params are random in both. Training batches are random arrays of the input
pipeline's shapes and dtypes (spacetime_jax/elite/pipeline.py); prompts hold the placeholder
once. No timing is asserted.

On 2 shared CPU cores tiny takes a few minutes; sd15 at --resolution 64, batch 1 about 15 (most
of it compiling the U-Net's backward pass twice); stage 2 is skipped there by default
(--stage2 runs it).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (compile_timed, cost_analysis_flops, device_description,
                               format_or_na, format_table, matmul_peak_flops, median,
                               memory_analysis_bytes, ratio_or_none, time_fn)
from benchmarks.neti_step import (FrozenModel, build_frozen_model, concept_data, count_params,
                                  measure_ours, step_statics, synthetic_prompts)
from configs import elite_global, elite_local
from configs.neti import get_config as neti_config
from spacetime_jax.diffusion.schedules import SchedulerConfig
from spacetime_jax.elite import sample as elite_sample
from spacetime_jax.elite.artifact import save_encoder
from spacetime_jax.elite.conditioning import EliteText
from spacetime_jax.elite.encoder import encoder_config_for, init_mapper_params
from spacetime_jax.elite.params import cross_attention_kv, local_kv_init
from spacetime_jax.elite.sample import EliteModel, EncoderParams, load_model
from spacetime_jax.elite.train import build_session, to_global
from spacetime_jax.models.clip_text import CLIPTextTransformer
from spacetime_jax.models.clip_vision import (CLIPVisionConfig, CLIPVisionTransformer,
                                              clip_vision_param_template)
from spacetime_jax.models.host_init import host_init
from spacetime_jax.models.pretrained import StableDiffusion
from spacetime_jax.models.unet import UNet2DConditionModel
from spacetime_jax.models.vae import AutoencoderKL
from spacetime_jax.neti.mapper import build_mapper, init_mapper_variables
from spacetime_jax.neti.train import mapper_config_from
from spacetime_jax.parallel import sharding
from spacetime_jax.parallel.mesh import make_mesh
from spacetime_jax.pipelines.sample_job import compute_dtype

# CLIP ViT-L/14's vision tower (openai/clip-vit-large-patch14), written out because nothing
# can be downloaded where this runs.
SD15_CLIP_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
SIZES = ("tiny", "sd15")
DEFAULT_RESOLUTION = {"tiny": 64, "sd15": 512}
DEFAULT_STEPS = {"tiny": 10, "sd15": 3}
DEFAULT_WARMUP = {"tiny": 2, "sd15": 1}
ENCODE_BATCHES = "1,8"
NETI_BATCH = 2  # configs/neti.py's train.batch_size at both sizes
SEED = 0
TINY_PROMPT = "a photo of a {}"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--resolution", type=int, default=None,
                        help="diffusion image side in pixels (default: 64 tiny, 512 sd15); "
                             "the CLIP tower always sees its own size (tiny's, 224 at sd15)")
    parser.add_argument("--batch", type=int, default=None,
                        help="ELITE training rows per step (default: the stage-1 config's, "
                             "8 tiny, 16 sd15)")
    parser.add_argument("--encode-batches", default=ENCODE_BATCHES,
                        help="images per encoder call, comma-separated (default 1,8)")
    parser.add_argument("--steps", type=int, default=None, help="timed calls (10 tiny, 3 sd15)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls before timing (2 tiny, 1 sd15)")
    parser.add_argument("--stage2", action=argparse.BooleanOptionalAction, default=None,
                        help="time the stage-2 step too (default: yes, except sd15 on a CPU)")
    parser.add_argument("--no-neti", action="store_true", help="skip the NeTI step")
    args = parser.parse_args(argv)
    on_cpu = jax.devices()[0].platform == "cpu"
    if args.resolution is None:
        args.resolution = DEFAULT_RESOLUTION[args.size]
    if args.batch is None:
        args.batch = elite_global.get_config(args.size).train.batch_size
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.size]
    if args.warmup is None:
        args.warmup = DEFAULT_WARMUP[args.size]
    if args.stage2 is None:
        args.stage2 = not (args.size == "sd15" and on_cpu)
    try:
        args.encode_batches = [int(b) for b in args.encode_batches.split(",") if b.strip()]
    except ValueError:
        args.encode_batches = []
    if not args.encode_batches or min(args.encode_batches) < 1:
        parser.error("--encode-batches: give positive batch sizes, such as 1,8")
    if args.resolution % 8 or args.resolution < 8:
        parser.error(f"--resolution {args.resolution}: give a positive multiple of 8 (the "
                     "VAE downsamples by 8)")
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be at least 1, --warmup at least 0")
    return args


# --- the frozen model --------------------------------------------------------------------------

def stage_config(stage: str, size: str, resolution: int, batch: int):
    """configs/elite_{stage}.py at `size`, one micro-batch of `batch` rows per step."""
    module = elite_global if stage == "global" else elite_local
    config = module.get_config(size)
    config.unlock()
    config.data.resolution = resolution
    config.train.batch_size = batch
    config.train.grad_accum = 1
    return config


def random_sd15_model(config, frozen: Optional[FrozenModel] = None) -> EliteModel:
    """SD 1.5 + CLIP ViT-L/14 vision, host-drawn random weights (`frozen`: SD 1.5's, already
    drawn) in config.compute_dtype, as load_model loads them; no tokenizer (prompts are
    synthetic ids) and the placeholder an ordinary vocabulary row."""
    frozen = frozen or build_frozen_model("sd15")
    dtype = compute_dtype(config.compute_dtype)
    to_device = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
    vision_config = CLIPVisionConfig.from_dict(SD15_CLIP_VISION)
    vision_params = to_device(host_init(clip_vision_param_template(vision_config), SEED + 3))
    sd = StableDiffusion(
        unet=UNet2DConditionModel(frozen.unet_config, local_branch=True, dtype=dtype),
        unet_params=to_device(frozen.unet_params),
        vae=AutoencoderKL(frozen.vae_config, dtype=dtype),
        vae_params=to_device(frozen.vae_params), vae_config=frozen.vae_config,
        text_encoder=CLIPTextTransformer(frozen.text_config, dtype=dtype),
        text_params=to_device(frozen.text_params), tokenizer=None,
        scheduler_config=SchedulerConfig(), source="random init, SD 1.5 shapes")
    placeholder_id = synthetic_prompts(frozen.text_config).placeholder_id
    text = EliteText(sd.text_encoder, sd.text_params, tokenizer=None,
                     placeholder=config.placeholder, placeholder_id=placeholder_id)
    encoder_config = encoder_config_for(vision_config, frozen.text_config.hidden_size,
                                        tuple(config.encoder.feature_layers),
                                        config.encoder.hidden_width)
    return EliteModel(sd=sd, vision=CLIPVisionTransformer(vision_config, dtype=dtype),
                      vision_params=vision_params, text=text, encoder_config=encoder_config)


def build_model(size: str, config, frozen: Optional[FrozenModel] = None) -> EliteModel:
    """tiny: the shipped toy-world model; sd15: random weights (`frozen`: SD 1.5's, drawn)."""
    return load_model(config) if size == "tiny" else random_sd15_model(config, frozen)


def as_neti_frozen(model: EliteModel) -> FrozenModel:
    """The same frozen model as neti_step's FrozenModel (its params already on the device)."""
    sd = model.sd
    return FrozenModel(sd.unet.config, sd.text_encoder.config, sd.vae_config, sd.unet_params,
                       sd.text_params, sd.vae_params)


def random_encoder(model: EliteModel) -> EncoderParams:
    """Both mappers at their init, K/V copies from the U-Net's (what training starts from)."""
    keys = jax.random.split(jax.random.key(SEED))
    unet_params = model.sd.unet_params
    return EncoderParams(
        global_mapper=init_mapper_params(model.encoder_config, keys[0]),
        global_kv=cross_attention_kv(unet_params),
        local_mapper=init_mapper_params(model.encoder_config, keys[1], local=True),
        local_kv=local_kv_init(unet_params))


# --- (1) encoding ------------------------------------------------------------------------------

def object_masks(batch: int, side: int) -> np.ndarray:
    """(B, side, side, 1) 0/1: a centred square over half the side, as an object's mask."""
    mask = np.zeros((batch, side, side, 1), np.float32)
    mask[:, side // 4: side - side // 4, side // 4: side - side // 4] = 1.0
    return mask


def measure_encoding(model: EliteModel, params: EncoderParams, batch: int, resolution: int,
                     steps: int, warmup: int) -> dict[str, Any]:
    """One encoder pass on `batch` random images, as encode_images runs it: the preprocessing
    (resize + CLIP normalization, eager) and then the jitted encoder, here AOT compiled."""
    rng = np.random.default_rng(SEED)
    images = rng.integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    masks = object_masks(batch, resolution)
    static = (model.vision, model.global_mapper, model.local_mapper,
              tuple(model.encoder_config.feature_layers), model.patch_grid, params.has_local)
    inputs = elite_sample.clip_inputs(images, masks, model.clip_size)
    compiled, compile_s = compile_timed(
        jax.jit(lambda p, v, g, l, m: elite_sample._encode(p, v, g, l, m, static=static)),
        params, model.vision_params, *inputs)

    def one_pass():
        return compiled(params, model.vision_params,
                        *elite_sample.clip_inputs(images, masks, model.clip_size))

    times, (words, tokens) = time_fn(one_pass, steps=steps, warmup=warmup)
    if params.has_local and tokens is None:
        raise RuntimeError("the encoder pass returned no local tokens")
    return {"seconds": median(times), "compile_s": compile_s,
            "flops": cost_analysis_flops(compiled), "memory": memory_analysis_bytes(compiled),
            "words": tuple(words.shape), "tokens": None if tokens is None else tuple(tokens.shape)}


# --- (2) NeTI's step on the same model ---------------------------------------------------------

def measure_neti(model: EliteModel, size: str, resolution: int, steps: int,
                 warmup: int) -> dict[str, Any]:
    """The `neti` job's step (benchmarks/neti_step.py's measure_ours), K = 1 concept, batch 2,
    one micro-batch; the mapper as configs/neti.py:{size} maps it for this model."""
    frozen = as_neti_frozen(model)
    mapper_config = mapper_config_from(neti_config(size), model.sd)
    mapper = build_mapper("neti", mapper_config)
    variables = init_mapper_variables(mapper, SEED)
    prompts = synthetic_prompts(frozen.text_config)
    embedding = np.asarray(frozen.text_params["embeddings"]["token_embedding"]["embedding"])
    target_norm = float(np.linalg.norm(embedding[prompts.placeholder_id]))
    statics = step_statics(frozen, mapper, mapper_config, NETI_BATCH, jnp.float32)
    data = concept_data(frozen, prompts, {k: v for k, v in variables.items() if k != "params"},
                        target_norm, resolution)
    params = jax.tree.map(lambda x: jnp.asarray(x)[None], variables["params"])
    result = measure_ours(statics, params, data, (frozen.unet_params, frozen.text_params),
                          steps, warmup)
    train = neti_config(size).train
    result.update(micro_batches=train.grad_accum, optimizer_steps=train.steps,
                  mapper_params=count_params(variables["params"]))
    return result


# --- (3) ELITE's training steps ----------------------------------------------------------------

def prompt_rows(model: EliteModel, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, 77) ids holding the placeholder once and its positions: the tokenizer's where the
    model has one, else neti_step's synthetic prompts (same placeholder id)."""
    if model.text.tokenizer is not None:
        ids, position = model.text.encode_prompt(TINY_PROMPT.format(model.text.placeholder))
        return np.tile(ids[None], (batch, 1)), np.full((batch,), position, np.int32)
    prompts = synthetic_prompts(model.sd.text_encoder.config)
    if prompts.placeholder_id != model.text.placeholder_id:
        raise RuntimeError("synthetic prompts and the model disagree on the placeholder id")
    rows = np.arange(batch) % len(prompts.ids)
    return prompts.ids[rows], prompts.positions[rows]


def synthetic_batch(stage: str, model: EliteModel, batch: int, resolution: int) -> dict:
    """One micro-batch, (1, B, ...), with the input pipeline's keys, shapes and dtypes."""
    rng = np.random.default_rng(SEED)
    clip = model.clip_size
    ids, positions = prompt_rows(model, batch)
    arrays = {
        "pixels": rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32),
        "clip_pixels": rng.standard_normal((batch, clip, clip, 3)).astype(np.float32),
        "input_ids": ids.astype(np.int32),
        "placeholder_position": positions.astype(np.int32),
        "example_index": np.arange(batch, dtype=np.int32),
    }
    if stage == "local":
        arrays.update(
            valid_mask=np.ones((batch, resolution, resolution, 1), np.float32),
            local_pixels=rng.standard_normal((batch, clip, clip, 3)).astype(np.float32),
            local_mask=object_masks(batch, clip))
    return {key: value[None] for key, value in arrays.items()}


def measure_stage(config, model: EliteModel, steps: int, warmup: int) -> dict[str, Any]:
    """The `elite` job's compiled step of config.stage on one device, the state donated."""
    mesh = make_mesh({"concept": 1, "data": 1, "model": 1}, jax.devices()[:1])
    session = build_session(config, model, mesh)
    batch_rows = config.train.batch_size
    state = sharding.shard_put(session.initial_state, session.state_shardings)
    frozen = sharding.shard_put(session.frozen, session.frozen_shardings)
    batch = to_global(synthetic_batch(config.stage, model, batch_rows, config.data.resolution),
                      session.batch_sharding, batch_rows)
    seed = jnp.uint32(config.train.seed)
    compiled, compile_s = compile_timed(session.step_fn(), state, batch, frozen,
                                        session.schedule, seed)
    carry = {"state": state}  # each step consumes (donates) the state the previous one made

    def one_step():
        carry["state"], metrics = compiled(carry["state"], batch, frozen, session.schedule,
                                           seed)
        return metrics

    times, metrics = time_fn(one_step, steps=steps, warmup=warmup)
    return {"seconds": median(times), "compile_s": compile_s,
            "flops": cost_analysis_flops(compiled), "memory": memory_analysis_bytes(compiled),
            "loss": float(metrics["loss"]), "trainable": count_params(state.params)}


def write_random_global_stage(folder: Path, model: EliteModel, params: EncoderParams,
                              base_model: str) -> Path:
    """Stage 2 trains on a frozen stage-1 encoder folder: the random one, written out."""
    return save_encoder(folder, model.encoder_config,
                        {"mapper": params.global_mapper, "kv": params.global_kv}, None,
                        base_model=base_model)


# --- report ------------------------------------------------------------------------------------

def mb(value: Optional[float]) -> str:
    return format_or_na(ratio_or_none(value, 2**20), ".1f")


def gflop(value: Optional[float]) -> str:
    return format_or_na(ratio_or_none(value, 1e9), ".2f")


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def encoding_rows(encodings: dict) -> list[list[str]]:
    rows = []
    for (branches, batch), r in encodings.items():
        rows.append([f"encode {branches}, batch {batch}", f"{r['seconds'] * 1e3:.1f}",
                     f"{r['seconds'] * 1e3 / batch:.1f}", f"{r['compile_s']:.1f}",
                     format_or_na(ratio_or_none(r["flops"], 1e9 * batch), ".2f"),
                     mb(r["memory"])])
    return rows


def step_row(name: str, r: Optional[dict], peak: float, note: str = "skipped") -> list[str]:
    if r is None:
        return [name] + [note] * 6
    achieved = ratio_or_none(r["flops"], r["seconds"])
    return [name, f"{r['seconds'] * 1e3:.1f}", f"{r['compile_s']:.1f}", gflop(r["flops"]),
            format_or_na(ratio_or_none(achieved, 1e9), ".1f"),
            format_or_na(ratio_or_none(achieved, peak / 100), ".1f"), mb(r["memory"])]


def print_report(args, model: EliteModel, peak: float, peak_side: int, encodings: dict,
                 neti: Optional[dict], stages: dict, stage2_note: str) -> None:
    sd, enc = model.sd, model.encoder_config
    millions = lambda tree: f"{count_params(tree) / 1e6:.1f} M"
    label = ("builtin:toyworld (shipped weights) + its image_encoder" if args.size == "tiny"
             else "SD 1.5 shapes + CLIP ViT-L/14 vision, random weights")
    print()
    print(f"device:        {device_description()}, jax {jax.__version__}")
    print(f"model:         {args.size}: {label}; U-Net {millions(sd.unet_params)}, text "
          f"encoder {millions(sd.text_params)}, VAE {millions(sd.vae_params)}, CLIP vision "
          f"{millions(model.vision_params)} ({model.vision.config.num_hidden_layers} layers, "
          f"width {model.vision.config.hidden_size}, {model.clip_size} px, patch "
          f"{model.vision.config.patch_size})")
    print(f"encoder:       random init; feature layers {list(enc.feature_layers)}, hidden "
          f"{enc.hidden_width}, {enc.num_words} words of {enc.word_dim}, "
          f"{model.patch_grid ** 2} local tokens")
    latent_side = args.resolution // sd.vae_config.downsample_factor
    print(f"settings:      resolution {args.resolution} px ({latent_side}x{latent_side} "
          f"latents); ELITE training batch {args.batch} (one "
          f"micro-batch); NeTI batch {NETI_BATCH}; encode batches {args.encode_batches}; "
          f"median of {args.steps} calls after {args.warmup} warm-up; float32")
    print(f"matmul peak:   {peak / 1e9:.1f} GFLOP/s (float32 {peak_side}x{peak_side}, jitted)")

    print()
    print("(1) ELITE encoding: one encoder pass (preprocess + CLIP vision + mapper(s))")
    print(format_table(["call", "ms/call", "ms/image", "compile s", "GFLOP/image", "mem MB"],
                       encoding_rows(encodings)))

    print()
    print("(2) per concept: NeTI trains, ELITE encodes one image")
    local_one = encodings.get(("global+local", 1)) or next(iter(encodings.values()))
    global_one = encodings.get(("global", 1))
    rows = []
    neti_total = None
    if neti is not None:
        per_step = neti["seconds"] * neti["micro_batches"]
        neti_total = per_step * neti["optimizer_steps"]
        rows.append([f"NeTI training (estimate: {neti['optimizer_steps']} steps x "
                     f"{neti['micro_batches']} micro-batches x {neti['seconds'] * 1e3:.1f} ms "
                     "median)", duration(neti_total), "1"])
    for name, r in (("ELITE encode, global, batch 1", global_one),
                    ("ELITE encode, global+local, batch 1", local_one)):
        if r is not None:
            rows.append([name, duration(r["seconds"]),
                         format_or_na(ratio_or_none(neti_total, r["seconds"]), ",.0f")])
    print(format_table(["per concept", "time", "NeTI / this"], rows))
    if neti is None:
        print("NeTI: skipped (--no-neti)")

    print()
    print("(3) training steps (one compiled optimizer step, one micro-batch)")
    headers = ["step", "ms/step", "compile s", "GFLOP/step", "GFLOP/s", "% peak", "peak mem MB"]
    table = [step_row(f"ELITE stage 1 (global), batch {args.batch}", stages.get("global"), peak),
             step_row(f"ELITE stage 2 (local), batch {args.batch}", stages.get("local"), peak,
                      note="skipped"),
             step_row(f"NeTI, batch {NETI_BATCH}, K=1", neti, peak, note="skipped")]
    print(format_table(headers, table))
    if stage2_note:
        print(stage2_note)
    for stage, r in stages.items():
        print(f"stage {stage}: {r['trainable']:,} trainable params, loss {r['loss']:.4f} "
              "(random data, sanity only)")
    for stage, module in (("1", elite_global), ("2", elite_local)):
        t = module.get_config(args.size).train
        print(f"configs/elite_{'global' if stage == '1' else 'local'}.py:{args.size}: stage "
              f"{stage} trains {t.steps} steps x batch {t.batch_size} x {t.grad_accum} "
              "micro-batches (the rows above time one micro-batch of --batch)")
    print("mem: XLA memory_analysis of the compiled call (arguments + outputs + temporaries - "
          "aliased); the frozen weights are arguments")


# --- main -------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    peak, peak_side = matmul_peak_flops()
    global_config = stage_config("global", args.size, args.resolution, args.batch)
    model = build_model(args.size, global_config)
    params = random_encoder(model)
    global_only = EncoderParams(global_mapper=params.global_mapper, global_kv=params.global_kv)
    print(f"model built ({args.size}); timing the encoder", flush=True)

    encodings = {}
    for batch in args.encode_batches:
        for branches, encoder in (("global", global_only), ("global+local", params)):
            encodings[(branches, batch)] = measure_encoding(
                model, encoder, batch, args.resolution, args.steps, args.warmup)
            r = encodings[(branches, batch)]
            print(f"encode {branches} batch {batch}: {r['seconds'] * 1e3:.1f} ms "
                  f"(compiled in {r['compile_s']:.1f} s)", flush=True)

    stages = {"global": measure_stage(global_config, model, args.steps, args.warmup)}
    print(f"stage 1 step: {stages['global']['seconds'] * 1e3:.1f} ms (compiled in "
          f"{stages['global']['compile_s']:.1f} s)", flush=True)
    stage2_note = ""
    if args.stage2:
        with tempfile.TemporaryDirectory() as work:
            local_config = stage_config("local", args.size, args.resolution, args.batch)
            local_config.global_checkpoint = str(write_random_global_stage(
                Path(work) / "encoder", model, params, global_config.model))
            stages["local"] = measure_stage(local_config, model, args.steps, args.warmup)
        print(f"stage 2 step: {stages['local']['seconds'] * 1e3:.1f} ms (compiled in "
              f"{stages['local']['compile_s']:.1f} s)", flush=True)
    else:
        stage2_note = ("stage 2: skipped (sd15 on a CPU: a third U-Net backward compile; "
                       "--stage2 runs it)")

    neti = None
    if not args.no_neti:
        neti = measure_neti(model, args.size, args.resolution, args.steps, args.warmup)
        print(f"NeTI step: {neti['seconds'] * 1e3:.1f} ms (compiled in {neti['compile_s']:.1f} "
              "s)", flush=True)
    print_report(args, model, peak, peak_side, encodings, neti, stages, stage2_note)


if __name__ == "__main__":
    main()
