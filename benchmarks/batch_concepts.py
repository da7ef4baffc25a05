"""Concepts per hour: K concepts in one NeTI run against the same K trained one after another.

  python benchmarks/batch_concepts.py [--model builtin:toyworld] [--ks 1,2,4,8] [--steps 10]
      [--concepts-per-pass 0] [--no-one-pass]

For each K, one Session of K concepts (the held-out toy-world concepts, cycled; 5 photos each)
with configs/neti.py:tiny's settings on this host's devices (mesh: every device on `concept`
when K allows, else on `data`), the compiled step timed over --steps after a warm-up. A
concept needs train.steps (200 for tiny) steps, so

  concepts/hour in one run   = K x 3600 / (train.steps x seconds per step of the K run)
  one after another          = 3600 / (train.steps x seconds per step of the K = 1 run)

and the ratio says what batching buys. The step computes the K concepts' gradients in passes
of at most train.concepts_per_pass concepts per device (--concepts-per-pass; 0, the default,
is auto: 2 on a CPU); where that makes more than one pass, the same K is also measured in one
pass (all at once), unless --no-one-pass. Also printed: XLA's FLOPs per step (a loop body
counted once), XLA's memory of one step call (arguments + outputs + temporaries - donated)
and its temporaries alone, and the per-device memory of the frozen weights (U-Net + text
encoder) and of the trainable state (mapper params + AdamW moments), from the arrays' own
shards.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from benchmarks.common import (compile_timed, cost_analysis_flops, format_or_na, format_table,
                               memory_fields, ratio_or_none)
from configs.neti import get_config
from spacetime_jax.models.builtin import resolve_builtin
from spacetime_jax.models.pretrained import load_stable_diffusion
from spacetime_jax.neti.concept import prepare_text_encoder
from spacetime_jax.neti.train import ConceptSpec, build_session
from spacetime_jax.parallel import sharding
from spacetime_jax.parallel.mesh import make_mesh
from spacetime_jax.toyworld.concepts import HELD_OUT_CONCEPTS, write_concept_images

SUPER_CATEGORIES = {"crescent": "circle", "arrow": "triangle", "bolt": "star",
                    "polka_heart": "heart"}


def per_device_bytes(tree) -> int:
    """Bytes one device holds of `tree` (its first device's shards)."""
    device = jax.devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        total += sum(shard.data.nbytes for shard in leaf.addressable_shards
                     if shard.device == device)
    return total


def concept_specs(k: int, folder: Path, super_category: str | None) -> list[ConceptSpec]:
    names = list(HELD_OUT_CONCEPTS)
    specs = []
    for i in range(k):
        base = names[i % len(names)]
        images = folder / f"{base}_{i}"
        write_concept_images(HELD_OUT_CONCEPTS[base], images, 5, seed=i)
        specs.append(ConceptSpec(f"{base}_{i}", str(images), f"<{base}-{i}>",
                                 super_category or SUPER_CATEGORIES[base]))
    return specs


def concepts_per_hour(k: int, train_steps: int, seconds_per_step: float) -> float:
    """Concepts a run of K concepts finishes per hour: each needs `train_steps` optimizer
    steps, and one step trains all K."""
    return k * 3600 / (train_steps * seconds_per_step)


def measure(k: int, model: str, steps: int, super_category: str | None, folder: Path,
            per_pass: int) -> dict:
    config = get_config("tiny")
    devices = jax.device_count()
    on_concept = devices if k % devices == 0 else 1
    config.update_from_flattened_dict({"model": model, "mesh.concept": on_concept,
                                       "mesh.data": -1, "train.concepts_per_pass": per_pass})
    sd = load_stable_diffusion(resolve_builtin(model))
    specs = concept_specs(k, folder / f"k{k}", super_category)
    text = prepare_text_encoder(sd.text_encoder, sd.tokenizer, sd.text_params,
                                [s.placeholder for s in specs], [s.super_category for s in specs])
    mesh = make_mesh(dict(config.mesh))
    session = build_session(config, sd, text, specs, mesh, folder / f"k{k}_{per_pass}_work")
    session.put()
    state = sharding.shard_put(session.initial_state, session.state_shardings)
    step, compile_seconds = compile_timed(session.step_fn(), state, session.data,
                                          session.frozen, session.schedule)
    state, _ = step(state, session.data, session.frozen, session.schedule)  # warm-up
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, losses = step(state, session.data, session.frozen, session.schedule)
        jax.block_until_ready(losses)
        times.append(time.perf_counter() - start)
    return {"k": k, "mesh": dict(mesh.shape), "seconds": float(np.median(times)),
            "passes": session.statics.concept_passes, "padded": session.padded_count,
            "compile": compile_seconds, "flops": cost_analysis_flops(step),
            **{f"{name}_mb": ratio_or_none(value, 2**20)
               for name, value in memory_fields(step).items()},
            "frozen_mb": per_device_bytes(session.frozen) / 2**20,
            "trainable_mb": per_device_bytes(state) / 2**20,
            "train_steps": config.train.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:toyworld")
    parser.add_argument("--ks", default="1,2,4,8", help="concept counts, comma-separated")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per K")
    parser.add_argument("--super-category", default=None,
                        help="one word for every concept (default: the nearest world word)")
    parser.add_argument("--concepts-per-pass", type=int, default=0,
                        help="train.concepts_per_pass (0: auto, -1: all at once)")
    parser.add_argument("--no-one-pass", action="store_true",
                        help="do not also measure in one pass a K that the setting splits")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    if 1 not in ks:
        ks = [1] + ks  # the one-after-another baseline
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); model {args.model}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            results.append(measure(k, args.model, args.steps, args.super_category, Path(tmp),
                                   args.concepts_per_pass))
            if results[-1]["passes"] > 1 and not args.no_one_pass:
                results.append(measure(k, args.model, args.steps, args.super_category,
                                       Path(tmp), -1))
    single = min((r for r in results if r["k"] == 1), key=lambda r: r["seconds"])
    rows = []
    for r in results:
        batched = concepts_per_hour(r["k"], r["train_steps"], r["seconds"])
        sequential = concepts_per_hour(1, single["train_steps"], single["seconds"])
        padding = r["padded"] - r["k"]
        rows.append([str(r["k"]) + (f" (+{padding} pad)" if padding else ""), str(r["passes"]),
                     str(r["mesh"]), f"{r['seconds'] * 1e3:.0f}",
                     f"{r['compile']:.0f}", format_or_na(r["flops"] and r["flops"] / 1e9, ".2f"),
                     f"{batched:.1f}", f"{sequential:.1f}", f"{batched / sequential:.2f}",
                     format_or_na(r["memory_mb"], ".1f"), format_or_na(r["temporaries_mb"], ".1f"),
                     f"{r['frozen_mb']:.1f}", f"{r['trainable_mb']:.2f}"])
    print(format_table(["K", "passes", "mesh", "ms/step", "compile s", "GFLOP/step",
                        "concepts/h batched", "concepts/h one by one", "ratio",
                        "step MB", "temporaries MB", "frozen MB/device",
                        "trainable MB/device"], rows))


if __name__ == "__main__":
    main()
