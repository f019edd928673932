"""Shared layer helpers: convolutions, dense layers and norms with logical axis names.

Every parameter created here carries logical axis names (linen logical
partitioning), so `infd_jax.sharding` can map them to mesh axes by config rules:
conv kernels are ("conv_h", "conv_w", "conv_in", "conv_out"), dense kernels
("mlp_in", "mlp_out"), biases follow their output axis, norm parameters are
("norm",). Compute dtype is a field of each caller; parameters, statistics and
outputs are in `full_precision(dtype)`: float32, or float64 for a float64 compute
dtype (JAX x64 mode).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from infd_jax.models import norms

Dtype = Any
Padding = str | Sequence[tuple[int, int]]

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
DENSE_AXES = ("mlp_in", "mlp_out")
# PyTorch's default init for Conv2d/Linear (kaiming_uniform with a=sqrt(5)) is
# uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases alike.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def full_precision(dtype: Dtype) -> jnp.dtype:
  """float32 for float32/bfloat16/float16 compute, float64 for float64 (x64 mode)."""
  return jnp.promote_types(dtype, jnp.float32)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                          implementation: str | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention` ([B, T, heads, d] each), whose softmax is always
  float32; float64 inputs (x64 mode) get the same attention with a float64 softmax."""
  if q.dtype != jnp.float64:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
  weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def torch_default_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's bias init."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(features: int, kernel: int, *, in_features: int, strides: int = 1,
         padding: Padding | None = None, use_bias: bool = True, dtype: Dtype = jnp.float32,
         kernel_init: nn.initializers.Initializer | None = None,
         bias_init: nn.initializers.Initializer | None = None, name: str | None = None) -> nn.Conv:
  """A 2-D convolution (NHWC) with explicit padding and logical axis names.

  Args:
    features: output channels.
    kernel: square kernel size.
    in_features: input channels (for PyTorch's fan-in based default init).
    strides: stride on both axes.
    padding: explicit ((top, bottom), (left, right)); defaults to symmetric (k-1)//2.
    use_bias: whether to add a bias.
    dtype: compute dtype.
    kernel_init / bias_init: override the PyTorch-like defaults.
    name: module name (mirrors the PyTorch state-dict key).
  """
  if padding is None:
    p = (kernel - 1) // 2
    padding = ((p, p), (p, p))
  kinit = kernel_init or torch_default_kernel_init
  binit = bias_init or torch_default_bias_init(in_features * kernel * kernel)
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides), padding=padding,
      use_bias=use_bias, dtype=dtype, param_dtype=full_precision(dtype),
      kernel_init=nn.with_logical_partitioning(kinit, CONV_AXES),
      bias_init=nn.with_logical_partitioning(binit, ("conv_out",)), name=name)


def dense(features: int, *, in_features: int, use_bias: bool = True,
          dtype: Dtype = jnp.float32, kernel_init: nn.initializers.Initializer | None = None,
          bias_init: nn.initializers.Initializer | None = None, name: str | None = None) -> nn.Dense:
  """A dense layer with PyTorch-like init and logical axis names."""
  kinit = kernel_init or torch_default_kernel_init
  binit = bias_init or torch_default_bias_init(in_features)
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=full_precision(dtype),
      kernel_init=nn.with_logical_partitioning(kinit, DENSE_AXES),
      bias_init=nn.with_logical_partitioning(binit, ("mlp_out",)), name=name)


def group_norm(eps: float, *, num_groups: int = 32, dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.Module:
  """GroupNorm with contiguous groups (as PyTorch), two-pass variance, stats in full precision.

  flax's for float32 and float64 compute; for a narrower compute dtype (bfloat16) the
  same parameters in `norms.LowPrecisionGroupNorm`, whose activations and input
  gradient stay in that dtype.
  """
  if full_precision(dtype) != jnp.dtype(dtype):
    return norms.LowPrecisionGroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype,
                                       name=name)
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=eps, dtype=dtype, param_dtype=full_precision(dtype),
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)
