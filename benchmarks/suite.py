"""The accelerator benchmark suite: one markdown table, ready for the README.

  python -m benchmarks.suite                     # sd15 on a GPU or TPU, tiny on a CPU
  python -m benchmarks.suite --size tiny --dtype float32 --steps 1 --warmup 0 --ks 1,2
                                                 # quickest: the test's (about 1.5 min on 2 cores)

Rows, all on jax.devices()[0] (numbers per chip; the table's heading names the device kind,
the device count and the backend):
  NeTI step     one optimizer step of the `neti` job's compiled step (benchmarks/neti_step.py's
                measure_ours: TrainState donated, frozen weights as arguments, AOT compiled) at
                configs/neti.py:{size}'s batch x gradient accumulation and resolution (sd15:
                2 x 4 at 512 px; tiny: 2 x 2 at 64 px), K = 1 concept; the frozen U-Net and
                text encoder in --dtype (bfloat16), the mapper and AdamW in float32. ms/step
                (median of --steps after --warmup), AOT compile time, FLOPs per step, MFU
                against the chip's dense bf16 peak (benchmarks/common.py's table of known
                device kinds; any other device: a jitted matmul's peak measured here, and the
                table says so), peak memory (the allocator's peak bytes in use where the
                backend counts them, else XLA's memory analysis of the compiled step).
  ELITE encode  one encoder pass per image (benchmarks/elite.py's measure_encoding: the image
                preprocessing, CLIP vision and the global mapper; + the local mapper: a second
                vision pass over the masked object) at batch 1 and 8; frozen parts in --dtype.
  NeTI, K       K concepts trained side by side in one step (--ks; K = 1, the one-after-
                another baseline, is the NeTI step row's measurement): concepts/hour =
                K x 3600 / (train.steps x seconds per step), benchmarks/batch_concepts.py's
                formula, and its ratio to K = 1.
Sizes: sd15 = SD 1.5's shapes (U-Net, CLIP-L text encoder, VAE, CLIP ViT-L/14 vision) with
random weights drawn on the host: timing needs only the shapes; tiny = the shipped toy-world
model (builtin:toyworld, its real weights and image encoder), so that a CPU runs the same code
in a few minutes (tiny with the defaults: about 4 minutes on 2 shared CPU cores).

FLOPs: XLA's cost analysis counts a loop's body once, and gradient accumulation is a loop
(lax.scan) inside the step: a compiled step of 4 micro-batches reports the FLOPs of one. So
the table's FLOPs/step are one micro-batch's forward + backward (XLA's cost analysis of the
lowered micro_batch_loss gradient, one concept) x the micro-batches per step; the compiled
step's own count is kept in the JSON (flops_compiled_step).

Writes --out/suite.json (every number) and --out/suite.md (what is printed). No timing is
asserted anywhere: the numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.batch_concepts import concepts_per_hour
from benchmarks.common import (cost_analysis_flops, device_peak_bytes, known_peak_flops,
                               matmul_peak_flops, ratio_or_none)
from benchmarks.elite import build_model, measure_encoding, random_encoder
from benchmarks.neti_step import (SEED, FrozenModel, build_frozen_model, concept_data,
                                  measure_ours, neti_mapper_config, step_statics,
                                  synthetic_prompts)
from configs import elite_global
from configs.neti import get_config as neti_config
from spacetime_jax.diffusion.schedules import SchedulerConfig, ddpm_schedule
from spacetime_jax.elite.sample import EncoderParams
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import load_stable_diffusion
from spacetime_jax.neti.mapper import build_mapper, init_mapper_variables
from spacetime_jax.neti.step import ConceptData, StepStatics, micro_batch_loss
from spacetime_jax.pipelines.sample_job import compute_dtype

SIZES = ("tiny", "sd15")
TINY_MODEL = "builtin:toyworld"
DEFAULT_STEPS = {"tiny": 3, "sd15": 10}
DEFAULT_WARMUP = {"tiny": 1, "sd15": 2}
DEFAULT_KS = "1,4,16"
ENCODE_BATCHES = (1, 8)
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "suite"
HEADERS = ("Benchmark", "Setting", "Time", "Compile", "FLOPs", "MFU", "Peak memory",
           "Throughput")
NA = "–"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default=None,
                        help="sd15: SD 1.5 shapes, random weights (default on a GPU or TPU); "
                             "tiny: the shipped toy-world model (default on a CPU)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="compute dtype of the frozen modules (U-Net, text encoder, CLIP "
                             "vision); the mappers and the optimizer stay float32")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed calls per row (default: 3 tiny, 10 sd15)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls before timing (default: 1 tiny, 2 sd15)")
    parser.add_argument("--ks", default=DEFAULT_KS,
                        help="concept counts trained side by side, comma-separated (default "
                             f"{DEFAULT_KS}; K = 1 is always measured: the baseline)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder for suite.json and suite.md (default benchmarks/out/suite)")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = "tiny" if jax.devices()[0].platform == "cpu" else "sd15"
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.size]
    if args.warmup is None:
        args.warmup = DEFAULT_WARMUP[args.size]
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    try:
        ks = {int(k) for k in args.ks.split(",") if k.strip()}
    except ValueError:
        ks = {0}
    if not ks or min(ks) < 1:
        parser.error(f"--ks {args.ks!r}: give positive concept counts, such as 1,4,16")
    args.ks = sorted(ks | {1})
    return args


def progress(message: str) -> None:
    """Progress goes to stderr: stdout holds the table alone."""
    print(message, file=sys.stderr, flush=True)


# --- the device ------------------------------------------------------------------------------

def device_facts() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"kind": device.device_kind, "count": jax.device_count(),
            "backend": jax.default_backend(), "jax": jax.__version__}


def peak_flops(dtype: Any) -> dict[str, Any]:
    """The chip's dense bf16 peak from the table of known device kinds, else a jitted matmul's
    FLOP/s measured here in `dtype`."""
    kind = jax.devices()[0].device_kind
    known = known_peak_flops(kind)
    if known is not None:
        return {"flops": known[0], "measured": False,
                "source": f"{known[1]} dense bf16 peak (datasheet)"}
    flops, side = matmul_peak_flops(dtype=dtype)
    return {"flops": flops, "measured": True,
            "source": f"measured: a jitted {side}x{side} {jnp.dtype(dtype).name} matmul "
                      f"({kind!r} is not in benchmarks/common.py's table of known devices)"}


# --- the frozen model ------------------------------------------------------------------------

def load_frozen(size: str, dtype: Any) -> FrozenModel:
    """The frozen Stable Diffusion with its U-Net and text encoder params on the device in the
    compute dtype, as the `neti` job loads them (the VAE stays where it is: the step never
    runs it). tiny: the shipped toy-world model; sd15: SD 1.5 shapes, host-drawn weights."""
    if size == "tiny":
        sd = load_stable_diffusion(resolve_builtin(TINY_MODEL), dtype)
        return FrozenModel(sd.unet.config, sd.text_encoder.config, sd.vae_config,
                           sd.unet_params, sd.text_params, sd.vae_params)
    frozen = build_frozen_model("sd15")
    put = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
    return dataclasses.replace(frozen, unet_params=put(frozen.unet_params),
                               text_params=put(frozen.text_params))


# --- NeTI ------------------------------------------------------------------------------------

@dataclasses.dataclass
class NetiRun:
    """One compiled step's inputs: K copies of a synthetic concept (each its own seed)."""
    statics: StepStatics
    params: Any          # mapper params, leading axis K
    data: ConceptData    # leading axis K
    grad_accum: int


def neti_run(frozen: FrozenModel, config, dtype: Any, num_concepts: int) -> NetiRun:
    """The step as configs/neti.py:{size} sets it (batch, accumulation, resolution, mapper),
    built with benchmarks/neti_step.py's builders."""
    mapper_config = neti_mapper_config(frozen)
    mapper = build_mapper(config.mapper.kind, mapper_config)
    variables = init_mapper_variables(mapper, SEED)
    prompts = synthetic_prompts(frozen.text_config)
    embedding = frozen.text_params["embeddings"]["token_embedding"]["embedding"]
    target_norm = float(np.linalg.norm(np.asarray(embedding[prompts.placeholder_id],
                                                  np.float32)))
    t = config.train
    statics = step_statics(frozen, mapper, mapper_config, t.batch_size, dtype,
                           grad_accum=t.grad_accum)
    data = concept_data(frozen, prompts, {k: v for k, v in variables.items() if k != "params"},
                        target_norm, config.data.resolution, num_concepts=num_concepts)
    params = jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x)[None], num_concepts, axis=0),
                          variables["params"])
    return NetiRun(statics, params, data, t.grad_accum)


def micro_batch_flops(run: NetiRun, frozen_params: Any) -> Optional[float]:
    """XLA's FLOPs of one concept's micro-batch, forward + backward to the mapper params: the
    cost analysis of the lowered gradient (no compile; no loop in it to be counted once)."""
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    grad = jax.jit(jax.value_and_grad(functools.partial(micro_batch_loss, statics=run.statics)))
    lowered = grad.lower(first(run.params), frozen_params, ddpm_schedule(SchedulerConfig()),
                         first(run.data), jax.random.key(SEED))
    return cost_analysis_flops(lowered)


def out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def measure_neti_step(frozen: FrozenModel, frozen_params: Any, config, dtype: Any, steps: int,
                      warmup: int) -> dict[str, Any]:
    """Row (a): K = 1, timed, with FLOPs and peak memory."""
    run = neti_run(frozen, config, dtype, 1)
    micro = micro_batch_flops(run, frozen_params)  # first: the step donates run.params
    result = measure_ours(run.statics, run.params, run.data, frozen_params, steps, warmup)
    peak_bytes = device_peak_bytes()  # before anything else runs: this step's peak
    t = config.train
    result.update(
        flops_compiled_step=result.pop("flops"), micro_batch_flops=micro,
        flops=None if micro is None else micro * run.grad_accum,
        peak_memory=peak_bytes if peak_bytes is not None else result["memory"],
        memory_source=("allocator peak bytes in use (device memory_stats)"
                       if peak_bytes is not None else
                       "XLA memory_analysis of the compiled step (arguments + outputs + "
                       "temporaries - aliased)"),
        batch=t.batch_size, grad_accum=t.grad_accum, resolution=config.data.resolution,
        train_steps=t.steps)
    return result


def measure_concepts(k: int, frozen: FrozenModel, frozen_params: Any, config, dtype: Any,
                     steps: int, warmup: int) -> dict[str, Any]:
    """Row (c) for K > 1: the same step over K stacked concepts; out of memory is a result."""
    try:
        run = neti_run(frozen, config, dtype, k)
        result = measure_ours(run.statics, run.params, run.data, frozen_params, steps, warmup)
    except Exception as error:  # jax raises XlaRuntimeError (a RuntimeError) when out of memory
        if not out_of_memory(error):
            raise
        return {"k": k, "error": "out of memory"}
    return {"k": k, "seconds": result["seconds"], "compile_s": result["compile_s"],
            "loss": result["loss"]}


# --- ELITE -----------------------------------------------------------------------------------

def measure_elite(size: str, frozen: FrozenModel, dtype_name: str, steps: int,
                  warmup: int) -> list[dict[str, Any]]:
    """Row (b): the encoder pass at each batch, global and global+local; the model as
    benchmarks/elite.py builds it (sd15: sharing the frozen SD 1.5 weights drawn above)."""
    config = elite_global.get_config(size)
    config.compute_dtype = dtype_name
    model = build_model(size, config, frozen if size == "sd15" else None)
    params = random_encoder(model)
    encoders = {"global": EncoderParams(global_mapper=params.global_mapper,
                                        global_kv=params.global_kv),
                "global+local": params}
    results = []
    for batch in ENCODE_BATCHES:
        for name, encoder in encoders.items():
            r = measure_encoding(model, encoder, batch, config.data.resolution, steps, warmup)
            results.append({"encoder": name, "batch": batch, "seconds_per_call": r["seconds"],
                            "seconds_per_image": r["seconds"] / batch,
                            "compile_s": r["compile_s"],
                            "flops_per_image": ratio_or_none(r["flops"], batch)})
            progress(f"ELITE encode {name}, batch {batch}: {r['seconds'] * 1e3:.1f} ms "
                     f"(compiled in {r['compile_s']:.1f} s)")
    return results


# --- the table -------------------------------------------------------------------------------

def _number(value: Optional[float], spec: str, unit: str = "") -> str:
    if value is None or not math.isfinite(value):
        return NA
    return f"{format(value, spec)}{unit}"


def ms(seconds: Optional[float], per: str) -> str:
    if seconds is None:
        return NA
    value = seconds * 1e3
    return _number(value, ",.1f" if value >= 10 else ".2f", f" ms/{per}")


def flops_text(flops: Optional[float], per: str) -> str:
    if flops is None:
        return NA
    value, unit = (flops / 1e12, "TFLOP") if flops >= 1e12 else (flops / 1e9, "GFLOP")
    return _number(value, ",.0f" if value >= 100 else ".3g", f" {unit}/{per}")


def memory_text(value: Optional[float]) -> str:
    if value is None:
        return NA
    if value >= 2**30:
        return _number(value / 2**30, ".2f", " GiB")
    return _number(value / 2**20, ".1f", " MiB")


def duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def mfu(flops: Optional[float], seconds: Optional[float], peak: float) -> Optional[float]:
    return ratio_or_none(ratio_or_none(flops, seconds), peak / 100)


def table_rows(args, neti: dict, elite: list[dict], concepts: list[dict],
               peak: dict) -> list[list[str]]:
    dtype = "bf16" if args.dtype == "bfloat16" else "fp32"
    model = "SD 1.5 shapes" if args.size == "sd15" else "toy-world model"
    micro = f"batch {neti['batch']} × {neti['grad_accum']} accumulation"
    rows = [[
        "NeTI step", f"{model}, {neti['resolution']} px, {micro}, K = 1; frozen {dtype}, "
        "mapper fp32", ms(neti["seconds"], "step"), _number(neti["compile_s"], ".1f", " s"),
        flops_text(neti["flops"], "step"),
        _number(mfu(neti["flops"], neti["seconds"], peak["flops"]), ".1f", " %"),
        memory_text(neti["peak_memory"]),
        f"{duration(neti['seconds'] * neti['train_steps'])} / {neti['train_steps']} steps"]]
    for r in elite:
        rows.append([
            f"ELITE encode, {r['encoder']}", f"batch {r['batch']}; frozen {dtype}",
            ms(r["seconds_per_image"], "image"), _number(r["compile_s"], ".1f", " s"),
            flops_text(r["flops_per_image"], "image"),
            _number(mfu(r["flops_per_image"], r["seconds_per_image"], peak["flops"]), ".1f",
                    " %"),
            NA, _number(1 / r["seconds_per_image"], ",.1f", " images/s")])
    for r in concepts:
        setting = f"side by side in one step, {micro} each"
        if "error" in r:
            rows.append([f"NeTI, K = {r['k']}", setting, r["error"]] + [NA] * 5)
            continue
        rows.append([
            f"NeTI, K = {r['k']}", setting, ms(r["seconds"], "step"),
            _number(r["compile_s"], ".1f", " s"), NA, NA, NA,
            f"{_number(r['concepts_per_hour'], ',.1f')} concepts/h "
            f"({_number(r['speedup'], '.2f')}× K = 1)"])
    return rows


def markdown_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] * 2 + ["--:"] * (len(headers) - 2)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def report(args, device: dict, peak: dict, neti: dict, elite: list[dict],
           concepts: list[dict]) -> str:
    heading = (f"**Benchmark suite** (`python -m benchmarks.suite --size {args.size}`): "
               f"`{device['kind']}` × {device['count']} ({device['backend']}), jax "
               f"{device['jax']}; numbers per chip, on 1 of {device['count']} device(s). "
               f"Peak: {flops_text(peak['flops'], 's')}, {peak['source']}.")
    notes = [
        f"Time: median of {args.steps} calls after {args.warmup} warm-up; compile: AOT "
        "lower + compile. Weights: "
        + ("random, SD 1.5 shapes (timing needs only shapes)." if args.size == "sd15" else
           f"the shipped toy-world model ({TINY_MODEL})."),
        "FLOPs: XLA's cost analysis of one micro-batch's forward + backward × the "
        "micro-batches per step (XLA counts the accumulation loop's body once); MFU: "
        "FLOPs / time / peak.",
        f"Peak memory: {neti['memory_source']}.",
        f"Throughput: NeTI trains a concept in train.steps = {neti['train_steps']} steps "
        "(configs/neti.py); concepts/h = K × 3600 / (train.steps × s/step).",
    ]
    return "\n".join([heading, "", markdown_table(HEADERS, table_rows(
        args, neti, elite, concepts, peak)), ""] + [f"- {note}" for note in notes])


def finite_or_none(value: Any) -> Any:
    """JSON without NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


# --- main ------------------------------------------------------------------------------------

def timed(what: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    progress(f"{what}: done in {time.perf_counter() - start:.1f} s")
    return result


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    dtype = compute_dtype(args.dtype)
    config = neti_config(args.size)
    device = device_facts()
    progress(f"benchmark suite, size {args.size}, on {device['count']} x {device['kind']} "
             f"({device['backend']})")

    frozen = timed("frozen model", lambda: load_frozen(args.size, dtype))
    frozen_params = (frozen.unet_params, frozen.text_params)
    neti = timed("NeTI step", lambda: measure_neti_step(frozen, frozen_params, config, dtype,
                                                        args.steps, args.warmup))
    progress(f"NeTI step: {neti['seconds'] * 1e3:.1f} ms/step (compiled in "
             f"{neti['compile_s']:.1f} s)")
    concepts = []
    for k in args.ks:
        r = ({"k": 1, "seconds": neti["seconds"], "compile_s": neti["compile_s"],
              "loss": neti["loss"]} if k == 1 else
             timed(f"NeTI K = {k}", lambda k=k: measure_concepts(
                 k, frozen, frozen_params, config, dtype, args.steps, args.warmup)))
        concepts.append(r)
    single = concepts_per_hour(1, config.train.steps, neti["seconds"])
    for r in concepts:
        if "seconds" in r:
            r["concepts_per_hour"] = concepts_per_hour(r["k"], config.train.steps, r["seconds"])
            r["speedup"] = r["concepts_per_hour"] / single
    elite = timed("ELITE encode", lambda: measure_elite(args.size, frozen, args.dtype,
                                                        args.steps, args.warmup))
    peak = peak_flops(dtype)  # measured (a matmul) only on a device kind not in the table

    text = report(args, device, peak, neti, elite, concepts)
    print(text, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.md").write_text(text + "\n")
    record = {"device": device, "size": args.size, "dtype": args.dtype, "steps": args.steps,
              "warmup": args.warmup, "peak_flops": peak, "neti_step": neti,
              "elite_encode": elite, "concepts": concepts, "table": text}
    (out / "suite.json").write_text(json.dumps(finite_or_none(record), indent=2) + "\n")
    progress(f"wrote {out / 'suite.json'} and {out / 'suite.md'}")


if __name__ == "__main__":
    main()
