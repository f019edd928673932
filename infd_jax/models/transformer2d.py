"""The text-conditioned spatial transformer of Stable Diffusion's UNet (LDM `SpatialTransformer`).

NHWC port of LDM's `ldm/modules/attention.py` (diffusers' `Transformer2DModel`
with `BasicTransformerBlock`), as SD 1.x and 2.x use it: GroupNorm(32, eps 1e-6),
`proj_in` (a 1x1 conv in SD 1.x, a Linear in SD 2.x: the same map on the
flattened tokens, so both are a Dense here), `depth` pre-LayerNorm blocks of
self-attention, cross-attention to the text context and a GEGLU feed-forward,
`proj_out` (zero init), plus the input. Parameter names follow the original
state-dict keys with dots of one container joined by "_":
`transformer_blocks.0.attn2.to_out.0` -> `transformer_blocks_0/attn2/to_out_0`,
`ff.net.0.proj` -> `ff_net_0_proj`, `ff.net.2` -> `ff_net_2`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from infd_jax.models import layers

Dtype = Any
_LN_EPS = 1e-5
_GN_EPS = 1e-6
_zeros = nn.initializers.zeros_init()


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(_LN_EPS, dtype=dtype, param_dtype=layers.full_precision(dtype),
                      name=name)


class Attention(nn.Module):
  """Multi-head attention of x [B, N, C] to context [B, M, Cc] (x itself if None).

  q, k, v have no bias, the output projection `to_out_0` has one; q.k is
  scaled by head_dim^-1/2.
  """
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    inner = self.heads * self.head_dim
    proj = lambda src, name: layers.dense(inner, in_features=src.shape[-1], use_bias=False,
                                          dtype=self.dtype, name=name)(src)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.head_dim))
    q, k, v = (split(proj(src, n)) for src, n in ((x, "to_q"), (context, "to_k"),
                                                 (context, "to_v")))
    out = layers.dot_product_attention(q, k, v, scale=self.head_dim ** -0.5,
                                       implementation=self.attention_impl)
    out = out.reshape(out.shape[:2] + (inner,))
    return layers.dense(x.shape[-1], in_features=inner, dtype=self.dtype, name="to_out_0")(out)


class BasicTransformerBlock(nn.Module):
  """x + attn1(norm1 x), + attn2(norm2 x, context), + GEGLU feed-forward(norm3 x)."""
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    c = x.shape[-1]
    attn = lambda name: Attention(self.heads, self.head_dim, self.dtype, self.attention_impl,
                                  name=name)
    x = x + attn("attn1")(_layer_norm(self.dtype, "norm1")(x))
    x = x + attn("attn2")(_layer_norm(self.dtype, "norm2")(x), context)
    h = layers.dense(8 * c, in_features=c, dtype=self.dtype,
                     name="ff_net_0_proj")(_layer_norm(self.dtype, "norm3")(x))
    h, gate = jnp.split(h, 2, axis=-1)
    h = h * jax.nn.gelu(gate, approximate=False)
    return x + layers.dense(c, in_features=4 * c, dtype=self.dtype, name="ff_net_2")(h)


class SpatialTransformer(nn.Module):
  """Feature map [B, H, W, C] attending to a text context [B, M, Cc] -> [B, H, W, C].

  Attributes:
    heads: attention heads; head_dim = C / heads.
    depth: transformer blocks (1 in SD 1.x and 2.x).
    norm_groups: GroupNorm groups of `norm`.
  """
  heads: int
  depth: int = 1
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    if c % self.heads:
      raise ValueError(f"{c} channels do not split into {self.heads} heads")
    h = layers.group_norm(_GN_EPS, num_groups=self.norm_groups, dtype=self.dtype,
                          name="norm")(x).reshape(b, hgt * wid, c)
    h = layers.dense(c, in_features=c, dtype=self.dtype, name="proj_in")(h)
    context = context.astype(self.dtype)
    for i in range(self.depth):
      h = BasicTransformerBlock(self.heads, c // self.heads, self.dtype, self.attention_impl,
                                name=f"transformer_blocks_{i}")(h, context)
    h = layers.dense(c, in_features=c, dtype=self.dtype, kernel_init=_zeros, bias_init=_zeros,
                     name="proj_out")(h)
    return x + h.reshape(b, hgt, wid, c)
