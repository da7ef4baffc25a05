"""The NeTI mapper: (timestep t, U-Net layer l) -> a token embedding (+ a textual-bypass vector).

METHODS.md, "NeTI". Fourier features of (t, l) with a fixed random matrix W, an input layer
whose units start as dot products with the features of 10 x L (t, l) anchors, a two-layer
MLP of width 128, nested dropout on that 128-vector, an output layer, and an L2
normalization of the whole output to `target_norm`. Always float32.

Module and param names mirror the reference's PyTorch state dict (`input_layer`,
`net.{1,2,4,5}`, `output_layer.0`), so the importer of official checkpoints is a plain
name table. W is not trained but belongs to the concept: it lives in the `encoding`
collection, next to `params`, so `mapper.init` returns {"params", "encoding": {"W"}} and
only `params` is handed to the optimizer.

Layers are initialized like PyTorch's nn.Linear (weights and biases uniform in
+-1/sqrt(fan_in)), as in the reference. A non-zero output bias also matters: nested dropout
at index 0 zeroes the whole hidden vector, and the output is then the normalized bias.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spacetime_jax.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000
ENCODERS = ("fourier", "plain")
MAPPER_KINDS = ("neti", "textual_inversion")
LEAKY_RELU_SLOPE = 0.01
LAYER_NORM_EPS = 1e-5  # PyTorch's default; Flax's is 1e-6.
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's floor on the norm.
HIGHEST = jax.lax.Precision.HIGHEST  # fp32 matmuls even where the default is bf16 passes (TPU).


@dataclasses.dataclass(frozen=True)
class MapperConfig:
    """The mapper's shape and training switches (defaults: the reference's, SD 1.x)."""
    num_layers: int = 16                # U-Net cross-attention layers
    num_anchor_timesteps: int = 10      # anchors t in {0, 100, ..., 900}
    num_frequencies: int = 1024         # rows of W
    sigma_t: float = 0.03
    sigma_l: float = 2.0
    hidden_width: int = 128
    token_dim: int = 768
    use_bypass: bool = True             # output token + bypass halves (2 x token_dim)
    nested_dropout: bool = True
    nested_dropout_prob: float = 0.5
    encoder: str = "fourier"            # "fourier" | "plain" (t, l linearly to [-1, 1])

    def __post_init__(self):
        for name in ("num_layers", "num_anchor_timesteps", "num_frequencies", "hidden_width",
                     "token_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise UserError(f"mapper config: {name} must be a positive integer, got {value!r}")
        if self.encoder not in ENCODERS:
            raise UserError(f"mapper config: encoder must be one of {ENCODERS}, "
                            f"got {self.encoder!r}")
        if self.encoder == "plain" and self.num_layers < 2:
            raise UserError("mapper config: the plain encoder needs num_layers >= 2")
        if not 0.0 <= self.nested_dropout_prob <= 1.0:
            raise UserError(f"mapper config: nested_dropout_prob must be in [0, 1], "
                            f"got {self.nested_dropout_prob!r}")
        if self.num_anchor_timesteps > NUM_TRAIN_TIMESTEPS:
            raise UserError(f"mapper config: num_anchor_timesteps must be at most "
                            f"{NUM_TRAIN_TIMESTEPS}, got {self.num_anchor_timesteps}")

    @property
    def output_dim(self) -> int:
        return 2 * self.token_dim if self.use_bypass else self.token_dim

    @property
    def num_anchors(self) -> int:
        """Width of the Fourier input layer: one unit per (t, l) anchor."""
        return self.num_anchor_timesteps * self.num_layers

    @property
    def input_width(self) -> int:
        """Width of the first hidden Dense's input."""
        return self.num_anchors if self.encoder == "fourier" else 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MapperConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"mapper config: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**values)


# ---------------------------------------------------------------------------- encodings

def sample_frequencies(rng: jax.Array, config: MapperConfig) -> jax.Array:
    """W (num_frequencies, 2) ~ N(0, 1), column 0 scaled by sigma_t, column 1 by sigma_l."""
    w = jax.random.normal(rng, (config.num_frequencies, 2), jnp.float32)
    return w * jnp.array([config.sigma_t, config.sigma_l], jnp.float32)


def fourier_encode(w: Any, timesteps: Any, layers: Any) -> Any:
    """(N,) t, (N,) l -> (N, 2F): concat(sin(W [t, l]), cos(W [t, l])) / sqrt(F), unit rows.

    numpy in, numpy out (host init of the anchor kernel); jax in, jax out (the model).
    """
    xp = np if all(isinstance(a, np.ndarray) for a in (w, timesteps, layers)) else jnp
    t = xp.asarray(timesteps, xp.float32)[:, None]
    l = xp.asarray(layers, xp.float32)[:, None]
    # Elementwise rather than a matmul: angles reach ~100 rad, where bf16 matmul passes
    # (the default precision on some accelerators) would scramble sin and cos.
    angles = t * w[:, 0] + l * w[:, 1]
    features = xp.concatenate([xp.sin(angles), xp.cos(angles)], axis=-1)
    return (features / np.float32(math.sqrt(w.shape[0]))).astype(xp.float32)


def plain_encode(timesteps: jax.Array, layers: jax.Array, num_layers: int) -> jax.Array:
    """(N,) t in 0..999, (N,) l in 0..L-1 -> (N, 2), each mapped linearly to [-1, 1]."""
    t = jnp.asarray(timesteps, jnp.float32) / (NUM_TRAIN_TIMESTEPS - 1) * 2 - 1
    l = jnp.asarray(layers, jnp.float32) / (num_layers - 1) * 2 - 1
    return jnp.stack([t, l], axis=-1)


def anchor_timesteps(config: MapperConfig) -> np.ndarray:
    """The anchor timesteps: 0, 100, ..., 900 at the defaults."""
    step = NUM_TRAIN_TIMESTEPS // config.num_anchor_timesteps
    return np.arange(config.num_anchor_timesteps) * step


def anchor_kernel(w: Any, config: MapperConfig) -> Any:
    """(2F, num_anchors) kernel whose column k is encode(t_a, l_a), t-major: k = t_idx*L + l."""
    t = np.repeat(anchor_timesteps(config), config.num_layers).astype(np.float32)
    l = np.tile(np.arange(config.num_layers), config.num_anchor_timesteps).astype(np.float32)
    return fourier_encode(w, t, l).T


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(||x||, 1e-12) along the last axis, like torch's F.normalize, with finite
    gradients at x = 0 (rsqrt of a floored square norm, never sqrt(0))."""
    square_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(square_norm, NORMALIZE_EPS ** 2))


def split_output(out: jax.Array, config: MapperConfig) -> tuple[jax.Array, Optional[jax.Array]]:
    """Mapper output -> (token half, bypass half), or (output, None) when it has no bypass."""
    width = out.shape[-1]
    if width == 2 * config.token_dim:
        return out[..., :config.token_dim], out[..., config.token_dim:]
    if width == config.token_dim:
        return out, None
    raise UserError(f"mapper output width {width} is neither token_dim {config.token_dim} "
                    f"nor twice it")


# ---------------------------------------------------------------------------- nested dropout

def check_truncation(truncation: int, hidden_width: int) -> None:
    if not isinstance(truncation, (int, np.integer)) or not 0 <= truncation <= hidden_width:
        raise UserError(f"truncation index {truncation} is outside 0..{hidden_width}")


def nested_dropout_limits(rng: jax.Array, layers: jax.Array, config: MapperConfig) -> jax.Array:
    """(N,) kept widths: one coin per LAYER (shared by that layer's rows, independent across
    layers); where it falls, the row keeps hidden[:i] for i uniform in 0..hidden_width-1,
    elsewhere the whole vector."""
    coin_rng, index_rng = jax.random.split(rng)
    coins = jax.random.bernoulli(coin_rng, config.nested_dropout_prob, (config.num_layers,))
    layer_of_row = jnp.clip(jnp.round(jnp.asarray(layers)).astype(jnp.int32), 0,
                            config.num_layers - 1)
    drop_from = jax.random.randint(index_rng, layer_of_row.shape, 0, config.hidden_width)
    return jnp.where(coins[layer_of_row], drop_from, config.hidden_width)


def keep_leading(hidden: jax.Array, limits: jax.Array) -> jax.Array:
    """Zeroes hidden[row, limits[row]:] in every row."""
    positions = jnp.arange(hidden.shape[-1])
    return jnp.where(positions[None, :] < limits[:, None], hidden, 0.0)


# ---------------------------------------------------------------------------- modules

def torch_linear_init(fan_in: int) -> Callable:
    """PyTorch nn.Linear's default for weights and biases: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense(features: int, fan_in: int, name: str, **kwargs) -> nn.Dense:
    init = torch_linear_init(fan_in)
    kwargs.setdefault("kernel_init", init)
    return nn.Dense(features, bias_init=init, precision=HIGHEST, param_dtype=jnp.float32,
                    dtype=jnp.float32, name=name, **kwargs)


class NeTIMapper(nn.Module):
    """__call__(timesteps (N,), layers (N,), target_norm) -> (N, config.output_dim).

    Rows may mix layers (the caller batches L layers x B samples in one call). Training:
    pass `dropout_rng` for nested dropout. Sampling: an optional `truncation` T in
    0..hidden_width zeroes hidden[T:] for every row.
    """
    config: MapperConfig

    def setup(self):
        c = self.config
        if c.encoder == "fourier":
            self.w = self.variable("encoding", "W",
                                   lambda: sample_frequencies(self.make_rng("params"), c))
            self.input_layer = _dense(
                c.num_anchors, 2 * c.num_frequencies, "input_layer",
                kernel_init=lambda key, shape, dtype=jnp.float32: anchor_kernel(self.w.value, c))
        self.net_1 = _dense(c.hidden_width, c.input_width, "net_1")
        self.net_2 = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=jnp.float32, name="net_2")
        self.net_4 = _dense(c.hidden_width, c.hidden_width, "net_4")
        self.net_5 = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=jnp.float32, name="net_5")
        self.output_layer_0 = _dense(c.output_dim, c.hidden_width, "output_layer_0")

    def encode(self, timesteps: jax.Array, layers: jax.Array) -> jax.Array:
        """The mapper's input features: (N, 2F) Fourier features or (N, 2) plain."""
        if self.config.encoder == "fourier":
            return fourier_encode(self.w.value, timesteps, layers)
        return plain_encode(timesteps, layers, self.config.num_layers)

    def hidden(self, timesteps: jax.Array, layers: jax.Array, *,
               truncation: Optional[int] = None,
               dropout_rng: Optional[jax.Array] = None) -> jax.Array:
        """(N, hidden_width): the vector that nested dropout acts on, after it acts."""
        if truncation is not None and dropout_rng is not None:
            raise UserError("truncation is for sampling and nested dropout (dropout_rng) for "
                            "training: pass one of them, not both")
        if truncation is not None:
            if not isinstance(truncation, jax.Array):  # a traced index is the caller's to check
                check_truncation(truncation, self.config.hidden_width)
        x = self.encode(timesteps, layers)
        if self.config.encoder == "fourier":
            x = self.input_layer(x)
        x = nn.leaky_relu(self.net_2(self.net_1(x)), LEAKY_RELU_SLOPE)
        x = nn.leaky_relu(self.net_5(self.net_4(x)), LEAKY_RELU_SLOPE)
        if truncation is not None:
            limits = jnp.full(x.shape[:1], truncation, jnp.int32)
            x = keep_leading(x, limits)
        elif dropout_rng is not None and self.config.nested_dropout:
            x = keep_leading(x, nested_dropout_limits(dropout_rng, layers, self.config))
        return x

    def __call__(self, timesteps: jax.Array, layers: jax.Array, target_norm: jax.Array, *,
                 truncation: Optional[int] = None,
                 dropout_rng: Optional[jax.Array] = None) -> jax.Array:
        x = self.hidden(timesteps, layers, truncation=truncation, dropout_rng=dropout_rng)
        # Normalized after dropout, so a truncated vector keeps the target norm.
        return l2_normalize(self.output_layer_0(x)) * jnp.asarray(target_norm, jnp.float32)


def constant_initializer(vector: Any) -> Callable:
    """An initializer returning `vector` (e.g. the super-category word's embedding)."""
    value = np.asarray(vector, np.float32)

    def init(key, shape, dtype=jnp.float32):
        if tuple(shape) != value.shape:
            raise UserError(f"initial embedding has shape {value.shape}, expected {tuple(shape)}")
        return jnp.asarray(value, dtype)

    return init


class TextualInversionEmbedding(nn.Module):
    """The textual-inversion baseline behind the mapper's interface: one learned embedding
    for every t and l, (N, token_dim); no bypass, no normalization; truncation, dropout_rng
    and target_norm are accepted and ignored."""
    token_dim: int
    embedding_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, timesteps: jax.Array, layers: jax.Array, target_norm: Any = None, *,
                 truncation: Optional[int] = None,
                 dropout_rng: Optional[jax.Array] = None) -> jax.Array:
        embedding = self.param("embedding", self.embedding_init, (self.token_dim,), jnp.float32)
        return jnp.broadcast_to(embedding, (jnp.shape(timesteps)[0], self.token_dim))


def build_mapper(kind: str, config: MapperConfig, *,
                 init_embedding: Optional[Any] = None) -> nn.Module:
    """"neti" -> NeTIMapper(config); "textual_inversion" -> TextualInversionEmbedding of
    width config.token_dim starting at `init_embedding` (required: the reference starts
    from the super-category word's embedding)."""
    if kind == "neti":
        return NeTIMapper(config)
    if kind == "textual_inversion":
        if init_embedding is None:
            raise UserError("the textual-inversion baseline needs init_embedding "
                            "(e.g. the super-category word's input embedding)")
        return TextualInversionEmbedding(config.token_dim, constant_initializer(init_embedding))
    raise UserError(f"unknown mapper kind {kind!r}; expected one of {MAPPER_KINDS}")


def init_mapper_variables(mapper: nn.Module, rng: Any) -> dict:
    """Fresh variables for `mapper`: {"params", "encoding": {"W"}} for NeTIMapper (no
    "encoding" with the plain encoder), {"params"} for the textual-inversion baseline.

    `rng`: a jax PRNG key or an int seed. NeTIMapper's variables are drawn on the host with
    numpy from the same scheme as its initializers (W ~ N(0,1) x sigmas, the anchor kernel,
    PyTorch-Linear uniform weights and biases, LayerNorm 1/0): an eager `mapper.init` costs
    one XLA compile per random draw (~10 s on a loaded 2-core CPU), this costs milliseconds.
    """
    zeros = jnp.zeros((1,), jnp.float32)
    if not isinstance(mapper, NeTIMapper):
        key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng
        return dict(mapper.init(key, zeros, zeros, 1.0))
    template = jax.eval_shape(mapper.init, jax.random.key(0), zeros, zeros, 1.0)
    host_rng = np.random.default_rng(_host_seed(rng))
    return _host_neti_variables(template, mapper.config, host_rng)


def _host_seed(rng: Any) -> list[int]:
    if isinstance(rng, (int, np.integer)):
        return [int(rng)]
    return [int(x) for x in np.asarray(jax.random.key_data(rng)).ravel()]


def _host_neti_variables(template: Mapping, config: MapperConfig,
                         host_rng: np.random.Generator) -> dict:
    variables: dict = {"params": {}}
    if "encoding" in template:
        w = host_rng.standard_normal((config.num_frequencies, 2)).astype(np.float32)
        w *= np.array([config.sigma_t, config.sigma_l], np.float32)
        variables["encoding"] = {"W": jnp.asarray(w)}
    for layer, leaves in sorted(template["params"].items()):
        if "scale" in leaves:  # LayerNorm
            variables["params"][layer] = {
                "scale": jnp.asarray(np.ones(leaves["scale"].shape, np.float32)),
                "bias": jnp.asarray(np.zeros(leaves["bias"].shape, np.float32))}
            continue
        fan_in, features = leaves["kernel"].shape
        bound = 1.0 / math.sqrt(fan_in)
        if layer == "input_layer":
            kernel = anchor_kernel(w, config)
        else:
            kernel = host_rng.uniform(-bound, bound, (fan_in, features))
        bias = host_rng.uniform(-bound, bound, (features,))
        variables["params"][layer] = {"kernel": jnp.asarray(kernel, jnp.float32),
                                      "bias": jnp.asarray(bias, jnp.float32)}
    return variables
