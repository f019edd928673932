"""VQGAN building blocks (NHWC): ResnetBlock, AttnBlock, Downsample, Upsample.

Naming rule: every child is named after the PyTorch attribute it replaces, so a
converter maps `<prefix>.<child>.weight` to `<prefix>/<child>/kernel` (REFERENCE.md
10.2/10.3): ResnetBlock has `norm1, conv1, norm2, conv2[, nin_shortcut]`,
AttnBlock has `norm, q, k, v, proj_out`, Downsample/Upsample have `conv`.
All GroupNorms are GN(32, eps 1e-6) (`norm_groups`: 32 is the official; the demo uses
fewer); all convs carry a bias.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from infd_jax.models import layers

Dtype = Any
GN_EPS = 1e-6


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


def group_norm_or_identity(normalize: bool, groups: int, dtype: Dtype, name: str | None = None):
  """GN(groups, eps 1e-6), or with normalize=False (the official switch) a cast to dtype."""
  if normalize:
    return layers.group_norm(GN_EPS, num_groups=groups, dtype=dtype, name=name)
  return lambda x: x.astype(dtype)


class ResnetBlock(nn.Module):
  """Pre-activation residual block: GN, swish, conv3x3, GN, swish, conv3x3.

  A 1x1 `nin_shortcut` projects the skip path when channels change. With
  `normalize=False` both GroupNorms are identities (the official switch).
  """
  features: int
  dtype: Dtype = jnp.float32
  norm_groups: int = 32
  normalize: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C_in] -> [B, H, W, features]."""
    c_in = x.shape[-1]
    norm = functools.partial(group_norm_or_identity, self.normalize, self.norm_groups,
                             self.dtype)
    h = swish(norm(name="norm1")(x))
    h = layers.conv(self.features, 3, in_features=c_in, dtype=self.dtype, name="conv1")(h)
    h = swish(norm(name="norm2")(h))
    # Dropout is p=0 everywhere in INFD, so it is left out.
    h = layers.conv(self.features, 3, in_features=self.features, dtype=self.dtype,
                    name="conv2")(h)
    if c_in != self.features:
      x = layers.conv(self.features, 1, in_features=c_in, dtype=self.dtype,
                      name="nin_shortcut")(x)
    return x.astype(h.dtype) + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, scale C^-0.5, residual.

  `jax.nn.dot_product_attention` runs on chunks of `query_chunk` query rows,
  each recomputed in the backward pass, so the float32 logits alive at once are
  [B, query_chunk, H*W] instead of [B, H*W, H*W] (64 MiB per image at 64 x 64).
  The softmax is per query row, so chunking does not change the result.
  """
  dtype: Dtype = jnp.float32
  query_chunk: int = 1024
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    b, hh, ww, c = x.shape
    t, n = hh * ww, self.query_chunk
    h = layers.group_norm(GN_EPS, num_groups=self.norm_groups, dtype=self.dtype, name="norm")(x)
    proj = lambda name: layers.conv(c, 1, in_features=c, dtype=self.dtype, name=name)
    # Row-major (h, w) flattening, the same token order as PyTorch's view(b, c, h*w).
    q, k, v = (proj(name)(h).reshape(b, t, 1, c) for name in ("q", "k", "v"))
    attend = jax.checkpoint(
        lambda q, k, v: layers.dot_product_attention(q, k, v, scale=c ** -0.5))
    if t > n and t % n == 0:
      chunks = q.reshape(b, t // n, n, 1, c).swapaxes(0, 1)
      out = jax.lax.map(lambda qc: attend(qc, k, v), chunks).swapaxes(0, 1)
    else:
      out = attend(q, k, v)
    return x.astype(out.dtype) + proj("proj_out")(out.reshape(b, hh, ww, c))


class Downsample(nn.Module):
  """Zero-pad bottom and right by 1, then a VALID stride-2 conv3x3 (VQGAN's asymmetric pad)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H//2, W//2, C] (for even H, W)."""
    c = x.shape[-1]
    return layers.conv(c, 3, in_features=c, strides=2, padding=((0, 1), (0, 1)),
                       dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 (each pixel repeated 2x2), then conv3x3."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C]."""
    c = x.shape[-1]
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return layers.conv(c, 3, in_features=c, dtype=self.dtype, name="conv")(x)
