"""Mesh construction and sharding rules.

Rule matching is checked in-process on abstract meshes (no devices needed); mesh building and
the per-device shard shapes after placement run in one child process with 8 CPU devices.
"""
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from spacetime_jax.errors import UserError
from spacetime_jax.parallel.mesh import MESH_AXES, maybe_initialize_distributed, mesh_shape
from spacetime_jax.parallel.sharding import (BATCH_RULES, CONCEPT_LEADING, MODEL_SHARDED_UNET,
                                             REPLICATED, spec_for)

REPO = Path(__file__).resolve().parents[1]


def abstract_mesh(concept: int = 1, data: int = 1, model: int = 1) -> jax.sharding.AbstractMesh:
    return jax.sharding.AbstractMesh((concept, data, model), MESH_AXES)


def test_mesh_shape_fills_the_minus_one_axis_and_defaults_missing_axes_to_one():
    assert mesh_shape({"concept": -1}, 8) == (8, 1, 1)
    assert mesh_shape({"concept": 2, "data": -1, "model": 2}, 8) == (2, 2, 2)
    assert mesh_shape({"data": 4, "model": 2}, 8) == (1, 4, 2)


@pytest.mark.parametrize("axes, message", [
    ({"concept": 3, "data": 2},
     "mesh concept=3 x data=2 x model=1 needs 6 devices; 8 are present"),
    ({"concept": 3, "data": -1},
     "mesh concept=3 x data=-1 x model=1 needs a multiple of 3 devices; 8 are present"),
    ({"concept": -1, "data": -1}, "at most one -1"),
    ({"replica": 8}, "mesh axes ['replica'] are unknown"),
])
def test_mesh_shape_mismatch_is_a_user_error(axes, message):
    with pytest.raises(UserError) as error:
        mesh_shape(axes, 8)
    assert message in str(error.value)


CLUSTER_VARIABLES = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "SLURM_NTASKS",
                     "OMPI_MCA_orte_hnp_uri", "JAX_COORDINATOR_ADDRESS")


def test_distributed_start_follows_the_config_then_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for name in CLUSTER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not maybe_initialize_distributed(None)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host TPU VM
    assert not maybe_initialize_distributed({"coordinator_address": ""})
    assert calls == []

    assert maybe_initialize_distributed(
        {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 0})
    assert calls[-1] == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4,
                         "process_id": 0}
    assert maybe_initialize_distributed({"coordinator_address": "auto"})
    assert calls[-1] == {"coordinator_address": None, "num_processes": None, "process_id": None}
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert maybe_initialize_distributed({})  # JAX reads the rest from SLURM's variables
    assert len(calls) == 3


def test_first_matching_rule_wins_and_unmatched_leaves_are_replicated():
    rules = [(r"mapper/.*kernel$", P(None, "model")), (r"mapper/", P("data"))]
    mesh = abstract_mesh(data=2, model=2)
    assert spec_for("mapper/dense_0/kernel", (4, 6), mesh, rules) == P(None, "model")
    assert spec_for("mapper/dense_0/bias", (6,), mesh, rules) == P("data")
    assert spec_for("text_encoder/embedding", (4, 6), mesh, rules) == P()
    assert spec_for("mapper/dense_0/kernel", (4, 6), mesh, REPLICATED) == P()


def test_dimensions_that_do_not_divide_fall_back_to_replicated():
    mesh = abstract_mesh(concept=2, data=4)
    assert spec_for("x", (4, 8, 3), mesh, BATCH_RULES) == P("concept", "data")
    assert spec_for("x", (3, 8, 3), mesh, BATCH_RULES) == P(None, "data")  # K=3 over 2
    assert spec_for("x", (4, 6, 3), mesh, BATCH_RULES) == P("concept")
    assert spec_for("step", (), mesh, CONCEPT_LEADING) == P()  # a spec longer than the rank


def test_unet_rules_shard_big_kernels_over_model_when_divisible():
    mesh = abstract_mesh(model=2)
    block = "up_blocks_1/attentions_0/transformer_blocks_0"
    expected = {
        (f"{block}/attn2/to_k/kernel", (32, 64)): P(None, "model"),
        (f"{block}/attn1/to_out_0/kernel", (64, 64)): P(None, "model"),
        (f"{block}/ff/net_0/proj/kernel", (64, 512)): P(None, "model"),
        (f"{block}/ff/net_2/kernel", (256, 64)): P(None, "model"),
        ("conv_in/kernel", (3, 3, 4, 32)): P(None, None, None, "model"),
        ("down_blocks_0/resnets_0/conv_shortcut/kernel", (1, 1, 32, 64)):
            P(None, None, None, "model"),
        ("conv_out/kernel", (3, 3, 32, 3)): P(),  # 3 output channels do not split in 2
        ("up_blocks_1/attentions_0/proj_in/kernel", (64, 64)): P(),  # SD 2.x linear proj_in
        (f"{block}/attn1/to_out_0/bias", (64,)): P(),
        (f"{block}/norm1/scale", (64,)): P(),
    }
    for (path, shape), spec in expected.items():
        assert spec_for(path, shape, mesh, MODEL_SHARDED_UNET) == spec, path


# One child process with 8 CPU devices: real meshes, NamedShardings and shard shapes.
_EIGHT_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from spacetime_jax.errors import UserError
from spacetime_jax.parallel import mesh as mesh_lib, sharding

def shard_shapes(tree):
    return jax.tree.map(lambda x: {s.data.shape for s in x.addressable_shards}, tree)

def specs(shardings):
    return jax.tree.map(lambda s: s.spec, shardings)

# K=8 concepts over concept=8: each device holds one concept's trainable state.
mesh = mesh_lib.make_mesh({"concept": -1})
assert dict(mesh.shape) == {"concept": 8, "data": 1, "model": 1}, mesh.shape
assert mesh_lib.replicas_per_concept(mesh) == 1
state = {"mapper": {"kernel": jnp.zeros((8, 5, 3)), "bias": jnp.zeros((8, 3))},
         "rng": jax.random.split(jax.random.key(0), 8)}
shardings = sharding.tree_shardings(state, mesh, sharding.CONCEPT_LEADING)
assert specs(shardings) == {"mapper": {"kernel": P("concept"), "bias": P("concept")},
                            "rng": P("concept")}, specs(shardings)
placed = sharding.shard_put(state, shardings)
assert shard_shapes(placed) == {"mapper": {"kernel": {(1, 5, 3)}, "bias": {(1, 3)}},
                                "rng": {(1,)}}, shard_shapes(placed)
kernel_devices = {s.device for s in placed["mapper"]["kernel"].addressable_shards}
assert len(kernel_devices) == 8

# K=1 with its batch over data=8: every device gets one example of the one concept.
mesh = mesh_lib.make_mesh({"concept": 1, "data": -1})
assert mesh_lib.replicas_per_concept(mesh) == 8
batch = {"latents": jnp.zeros((1, 8, 4, 4, 3)), "timesteps": jnp.zeros((1, 8), jnp.int32)}
placed = sharding.shard_put(batch, sharding.tree_shardings(batch, mesh, sharding.BATCH_RULES))
assert shard_shapes(placed) == {"latents": {(1, 1, 4, 4, 3)}, "timesteps": {(1, 1)}}

# U-Net kernels over model=2 when the output dim divides, replicated when not.
mesh = mesh_lib.make_mesh({"data": 4, "model": 2})
unet = {"conv_in": {"kernel": jnp.zeros((3, 3, 4, 32))},
        "conv_out": {"kernel": jnp.zeros((3, 3, 32, 3))},
        "mid_block": {"attentions_0": {"transformer_blocks_0": {"attn2": {
            "to_k": {"kernel": jnp.zeros((32, 64))}}}}}}
shardings = sharding.tree_shardings(unet, mesh, sharding.MODEL_SHARDED_UNET)
placed = sharding.shard_put(unet, shardings)
assert specs(shardings)["conv_out"]["kernel"] == P()
assert shard_shapes(placed) == {
    "conv_in": {"kernel": {(3, 3, 4, 16)}}, "conv_out": {"kernel": {(3, 3, 32, 3)}},
    "mid_block": {"attentions_0": {"transformer_blocks_0": {"attn2": {
        "to_k": {"kernel": {(32, 32)}}}}}}}, shard_shapes(placed)

try:
    mesh_lib.make_mesh({"concept": 3, "data": 2})
    raise AssertionError("a 6-device mesh on 8 devices was accepted")
except UserError as error:
    assert str(error) == "mesh concept=3 x data=2 x model=1 needs 6 devices; 8 are present"
print("OK")
"""


def test_meshes_and_shard_shapes_on_eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    child = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and child.stdout.strip().endswith("OK"), child.stderr[-3000:]
