"""The ADM ("guided-diffusion") UNet that denoises the 3x64x64 latent in stage 2.

NHWC port of the official `diffusion/unet.py:UNetModel` with the settings INFD
uses (REFERENCE.md 6.1): no scale-shift norm, legacy QKV attention layout, dropout 0
(so no dropout layers), `conv_resample=True`, `resblock_updown=False`.

Naming rule (for checkpoint conversion): in a PyTorch state-dict key, the block
prefix (`time_embed.j`, `input_blocks.i.j`, `middle_block.j`,
`output_blocks.i.j`, `out.j`) names the top-level submodule with dots turned
into underscores, and the rest of the key up to the parameter name names the
layer inside it the same way; the parameter names follow REFERENCE.md 10.3.
Examples: `time_embed.0` -> `time_embed_0`, `input_blocks.0.0` ->
`input_blocks_0_0`, `input_blocks.4.0.in_layers.2` ->
`input_blocks_4_0/in_layers_2`, `input_blocks.4.1.qkv` -> `input_blocks_4_1/qkv`,
`input_blocks.3.0.op` -> `input_blocks_3_0/op`, `middle_block.1.proj_out` ->
`middle_block_1/proj_out`, `output_blocks.2.2.conv` -> `output_blocks_2_2/conv`,
`out.0` / `out.2` -> `out_0` / `out_2`. Parameters are `kernel`/`bias` (convs,
dense) and `scale`/`bias` (GroupNorm); the attention `qkv`/`proj_out` Conv1d
weights become Dense kernels `w[:, :, 0].T`, Linear weights `w.T`, conv weights
`w.transpose(2, 3, 1, 0)`. GroupNorm has 32 groups, so every width must be a
multiple of 32.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from infd_jax.models import layers
from infd_jax.models.blocks import Upsample  # the same nearest x2 + conv3x3 as VQGAN's

Dtype = Any

_GN_EPS = 1e-5  # PyTorch's GroupNorm default; the VQGAN parts use 1e-6.
_zeros = nn.initializers.zeros_init()


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos(t f), sin(t f)] (cos first), f_i = max_period^(-i/half).

  Args:
    t: [B] timesteps (integers or floats), not rescaled.
    dim: embedding width; an odd width gets a trailing zero column.
    max_period: controls the lowest frequency.

  Returns:
    [B, dim] float32 embedding.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class ResBlock(nn.Module):
  """GN-SiLU-conv, + Linear(SiLU(emb)), GN-SiLU-conv(zero init), + skip. [B,H,W,Ci] -> [B,H,W,Co]."""
  out_channels: int
  dtype: Dtype = jnp.float32
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    ch, out = x.shape[-1], self.out_channels
    h = nn.silu(layers.group_norm(_GN_EPS, num_groups=self.norm_groups, dtype=self.dtype,
                                  name="in_layers_0")(x))
    h = layers.conv(out, 3, in_features=ch, dtype=self.dtype, name="in_layers_2")(h)
    e = layers.dense(out, in_features=emb.shape[-1], dtype=self.dtype,
                     name="emb_layers_1")(nn.silu(emb))
    h = h + e[:, None, None, :]
    h = nn.silu(layers.group_norm(_GN_EPS, num_groups=self.norm_groups, dtype=self.dtype,
                                  name="out_layers_0")(h))
    h = layers.conv(out, 3, in_features=out, dtype=self.dtype, kernel_init=_zeros,
                    bias_init=_zeros, name="out_layers_3")(h)
    if ch != out:
      x = layers.conv(out, 1, in_features=ch, dtype=self.dtype, name="skip_connection")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the H*W raster with the legacy QKV layout.

  The `qkv` projection's 3C output channels are grouped per head as
  [q(d), k(d), v(d)], d = num_head_channels, i.e. the axis reshapes to
  (heads, 3, d). q.k is scaled by d^-1/2 (the official d^-1/4 on each of q and
  k), softmax in float32. [B, H, W, C] -> [B, H, W, C].
  """
  num_head_channels: int = 32
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None  # jax.nn.dot_product_attention `implementation`
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    d = self.num_head_channels
    heads = c // d
    h = layers.group_norm(_GN_EPS, num_groups=self.norm_groups, dtype=self.dtype,
                          name="norm")(x).reshape(b, hgt * wid, c)
    qkv = layers.dense(3 * c, in_features=c, dtype=self.dtype, name="qkv")(h)
    qkv = qkv.reshape(b, hgt * wid, heads, 3, d)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    a = layers.dot_product_attention(q, k, v, scale=d ** -0.5,
                                     implementation=self.attention_impl)
    a = a.reshape(b, hgt * wid, c)
    out = layers.dense(c, in_features=c, dtype=self.dtype, kernel_init=_zeros,
                       bias_init=_zeros, name="proj_out")(a)
    return x + out.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
  """3x3 conv, stride 2, symmetric padding 1 (not the VQGAN's asymmetric pad)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    return layers.conv(c, 3, in_features=c, strides=2, padding=((1, 1), (1, 1)),
                       dtype=self.dtype, name="op")(x)



class UNet(nn.Module):
  """ADM UNet eps-predictor: (x [B, H, W, in_channels], t [B] int) -> eps [B, H, W, out_channels].

  Attributes:
    model_channels: base width; the time embedding is 4x this.
    channel_mult: width multiplier per resolution level.
    num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    attention_resolutions: downsampling factors (1, 2, 4, ...) that get attention.
    num_head_channels: channels per attention head.
    in_channels / out_channels: latent channels.
    dtype: compute dtype (parameters, GroupNorm statistics, softmax and the
      output are in `layers.full_precision(dtype)`: float32, float64 in x64 mode;
      the sinusoidal timestep embedding is float32, as the official one).
    attention_impl: passed to `jax.nn.dot_product_attention` (None/"xla", or
      "cudnn" for flash attention on GPU, which needs bf16/fp16 compute).
    remat: rematerialise each ResBlock/AttentionBlock in the backward pass to
      save activation memory (same parameters and outputs).
  """
  model_channels: int = 224
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (8, 4, 2)
  num_head_channels: int = 32
  in_channels: int = 3
  out_channels: int = 3
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  remat: bool = False
  norm_groups: int = 32  # GroupNorm groups everywhere (32: official; the demo uses fewer)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"expected {self.in_channels} input channels, got {x.shape}")
    mc, dt = self.model_channels, self.dtype
    res_cls = nn.remat(ResBlock) if self.remat else ResBlock
    attn_cls = nn.remat(AttentionBlock) if self.remat else AttentionBlock

    def res(out, name):
      return res_cls(out, dtype=dt, norm_groups=self.norm_groups, name=name)

    def attn(name):
      return attn_cls(self.num_head_channels, dtype=dt, attention_impl=self.attention_impl,
                      norm_groups=self.norm_groups, name=name)

    emb = timestep_embedding(t, mc)
    emb = layers.dense(4 * mc, in_features=mc, dtype=dt, name="time_embed_0")(emb)
    emb = layers.dense(4 * mc, in_features=4 * mc, dtype=dt, name="time_embed_2")(nn.silu(emb))

    h = layers.conv(mc, 3, in_features=self.in_channels, dtype=dt, name="input_blocks_0_0")(x)
    skips = [h]
    block, ds = 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res(mult * mc, f"input_blocks_{block}_0")(h, emb)
        if ds in self.attention_resolutions:
          h = attn(f"input_blocks_{block}_1")(h)
        skips.append(h)
        block += 1
      if level != len(self.channel_mult) - 1:
        h = Downsample(dtype=dt, name=f"input_blocks_{block}_0")(h)
        skips.append(h)
        block += 1
        ds *= 2

    ch = h.shape[-1]
    h = res(ch, "middle_block_0")(h, emb)
    h = attn("middle_block_1")(h)
    h = res(ch, "middle_block_2")(h, emb)

    block = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(mult * mc, f"output_blocks_{block}_0")(h, emb)
        sub = 1
        if ds in self.attention_resolutions:
          h = attn(f"output_blocks_{block}_1")(h)
          sub += 1
        if level and i == self.num_res_blocks:
          h = Upsample(dtype=dt, name=f"output_blocks_{block}_{sub}")(h)
          ds //= 2
        block += 1

    h = nn.silu(layers.group_norm(_GN_EPS, num_groups=self.norm_groups, dtype=dt, name="out_0")(h))
    h = layers.conv(self.out_channels, 3, in_features=h.shape[-1], dtype=dt, kernel_init=_zeros,
                    bias_init=_zeros, name="out_2")(h)
    return h.astype(layers.full_precision(dt))
