"""The device mesh (axes `concept`, `data`, `model`) and multi-host start-up.

K concepts spread over `concept`, each concept's batch over `data` (its replicas), big frozen
kernels over `model`. The mesh always has all three axes, in that order, so sharding rules can
name any of them; an axis left out of the config has size 1.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from spacetime_jax.errors import UserError
from spacetime_jax.models.attention_kernels import resolve_attention

MESH_AXES = ("concept", "data", "model")


def mesh_shape(axes: Mapping[str, int], device_count: int) -> tuple[int, ...]:
    """Sizes of (concept, data, model); one size may be -1: whatever the others leave."""
    unknown = sorted(set(axes) - set(MESH_AXES))
    if unknown:
        raise UserError(f"mesh axes {unknown} are unknown; known: {list(MESH_AXES)}")
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    described = " x ".join(f"{name}={size}" for name, size in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise UserError(f"mesh {described}: sizes must be positive, with at most one -1 "
                        "(fill the rest)")
    fixed = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if device_count % fixed:
            raise UserError(f"mesh {described} needs a multiple of {fixed} devices; "
                            f"{device_count} are present")
        sizes[sizes.index(-1)] = device_count // fixed
    elif fixed != device_count:
        raise UserError(f"mesh {described} needs {fixed} devices; {device_count} are present")
    return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
    """A mesh over all devices (or `devices`) with axes concept, data, model.

    Axis types are Auto: the step is jitted with explicit in/out shardings and XLA propagates
    the rest, so model code stays free of sharding annotations (jax.make_mesh's default,
    Explicit, would make every op's output sharding part of its type).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                         devices=devices)


def replicas_per_concept(mesh: jax.sharding.Mesh) -> int:
    """How many devices share one concept's batch: the learning-rate scaling counts these."""
    return mesh.shape["data"]


def topology(mesh: jax.sharding.Mesh, *, global_batch: int, learning_rate: float) -> dict:
    """What a checkpoint records of the devices it was trained on; a resume must keep the
    global batch and the learning rate (training/loop.py checks them)."""
    return {"processes": jax.process_count(), "devices": jax.device_count(),
            "mesh": {name: int(size) for name, size in mesh.shape.items()},
            "global_batch": int(global_batch), "learning_rate": float(learning_rate)}


def _cluster_in_environment() -> bool:
    """True where the environment describes a multi-process job that JAX can join by itself."""
    env = os.environ
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return (len([h for h in hosts.split(",") if h]) > 1
            or ("SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1)
            or "OMPI_MCA_orte_hnp_uri" in env
            or bool(env.get("JAX_COORDINATOR_ADDRESS")))


def maybe_initialize_distributed(settings: Mapping[str, Any] | None = None) -> bool:
    """Joins a multi-process run when the config or the environment asks; returns whether
    this process is part of one. Call before anything touches jax devices; calling it again is
    harmless.

    settings: the config's `distributed` section (dict or ConfigDict), all keys optional:
      coordinator_address  "host:port" of process 0; "auto" lets JAX detect everything (a
                           TPU-VM pod, SLURM, Open MPI); "" (default) means single-process
                           unless the environment names a cluster (TPU_WORKER_HOSTNAMES with
                           several hosts, a multi-task SLURM job, Open MPI, JAX_COORDINATOR_ADDRESS)
      num_processes        0 (default): detected
      process_id           -1 (default): detected
    """
    if jax.distributed.is_initialized():
        return True
    settings = settings or {}
    address = settings.get("coordinator_address", "") or ""
    if not address and not _cluster_in_environment():
        return False
    num_processes = settings.get("num_processes", 0) or None
    process_id = settings.get("process_id", -1)
    # CPU processes need a collectives backend to talk to each other (accelerators bring
    # their own and ignore this setting): multi-process CPU runs, local tests included.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=None if address in ("", "auto") else address,
        num_processes=num_processes,
        process_id=None if process_id is None or process_id < 0 else process_id)
    logging.info("joined a run of %d processes as process %d", jax.process_count(),
                 jax.process_index())
    return True


def tracing_mesh(mesh: jax.sharding.Mesh, attention: str):
    """The context a step is traced and compiled in: the splash kernel (a Pallas TPU call)
    cannot be partitioned automatically and runs per device inside a shard_map over this
    mesh, which it finds through jax.set_mesh; every other kernel needs nothing."""
    if resolve_attention(attention) == "splash" and mesh.size > 1:
        return jax.set_mesh(mesh)
    return contextlib.nullcontext()
