"""GroupNorm for low-precision (bfloat16) compute with a hand-written backward pass.

flax's GroupNorm promotes the normalisation to float32 and autodiff then keeps
activation-sized float32 tensors between the backward fusions (two per norm in the
TPU plan). Here the statistics and every reduction stay float32, but the
normalised output and the input gradient are written in the compute dtype, and
the backward pass reads only x and the output cotangent. The parameters are the
same as flax's (`scale`, `bias`, float32, logical axis "norm"), so checkpoints
move between the two; `layers.group_norm` picks this one only for a compute
dtype narrower than float32, so float32 programs are unchanged.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _group_mean(per_channel: jax.Array, groups: int, count: int) -> jax.Array:
  """[B, C] per-channel sums -> [B, C]: the mean over each channel's group (count items)."""
  b, c = per_channel.shape
  sums = per_channel.reshape(b, groups, c // groups).sum(-1, keepdims=True) / count
  return jnp.broadcast_to(sums, (b, groups, c // groups)).reshape(b, c)


def _stats(x: jax.Array, groups: int, eps: float) -> tuple[jax.Array, jax.Array]:
  """Per-group mean and 1 / sqrt(var + eps) (two-pass variance, float32), broadcast to
  [B, 1, ..., 1, C]. Reductions run over the spatial axes per channel first, so the
  activation is never regrouped (a regrouped minor axis is a relayout on TPU)."""
  b, c = x.shape[0], x.shape[-1]
  spatial = tuple(range(1, x.ndim - 1))
  count = x.size // (b * groups)
  expand = lambda v: v.reshape(b, *([1] * len(spatial)), c)
  xf = x.astype(jnp.float32)
  mean = expand(_group_mean(jnp.sum(xf, spatial), groups, count))
  var = _group_mean(jnp.sum(jnp.square(xf - mean), spatial), groups, count)
  return mean, expand(jax.lax.rsqrt(var + eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
               eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias per group of channels, in x's dtype."""
  mean, rstd = _stats(x, groups, eps)
  a = rstd * scale
  return (x.astype(jnp.float32) * a + (bias - mean * a)).astype(x.dtype)


def _forward(x, scale, bias, groups, eps):
  return group_norm(x, scale, bias, groups, eps), (x, scale)


def _backward(groups, eps, residuals, dy):
  """dx = rstd (dy scale - mean_g(dy scale) - xhat mean_g(dy scale xhat)), written as
  dy A + x B + C with per-channel A, B, C, so the only activation-sized work is two
  reductions (sum dy, sum dy x) and one elementwise pass, with no shared intermediate
  for XLA to store."""
  x, scale = residuals
  b, c = x.shape[0], x.shape[-1]
  spatial = tuple(range(1, x.ndim - 1))
  count = x.size // (b * groups)
  mean, rstd = (v.reshape(b, c) for v in _stats(x, groups, eps))
  xf, dyf = x.astype(jnp.float32), dy.astype(jnp.float32)
  sum_dy, sum_dy_x = jnp.sum(dyf, spatial), jnp.sum(dyf * xf, spatial)  # [B, C]
  sum_dy_xhat = rstd * (sum_dy_x - mean * sum_dy)
  m1 = _group_mean(sum_dy * scale, groups, count)
  m2 = _group_mean(sum_dy_xhat * scale, groups, count)
  a, b_x = rstd * scale, -rstd * rstd * m2
  c_0 = mean * rstd * rstd * m2 - rstd * m1
  expand = lambda v: v.reshape(b, *([1] * len(spatial)), c)
  dx = dyf * expand(a) + xf * expand(b_x) + expand(c_0)
  return dx.astype(x.dtype), jnp.sum(sum_dy_xhat, 0), jnp.sum(sum_dy, 0)


group_norm.defvjp(_forward, _backward)


class LowPrecisionGroupNorm(nn.Module):
  """GroupNorm(num_groups, epsilon) over [B, ..., C] computing in `dtype` (bfloat16)."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.bfloat16

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    param = lambda name, init: self.param(
        name, nn.with_logical_partitioning(init, ("norm",)), (c,), jnp.float32)
    scale, bias = param("scale", nn.initializers.ones), param("bias", nn.initializers.zeros)
    return group_norm(x.astype(self.dtype), scale, bias, self.num_groups, self.epsilon)
