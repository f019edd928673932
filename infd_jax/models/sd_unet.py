"""Stable Diffusion's text-conditioned UNet (SD 1.x and 2.x shapes), NHWC.

LDM's `openaimodel.UNetModel` with `use_spatial_transformer=True` (diffusers'
`UNet2DConditionModel` with CrossAttn down/up blocks): the ADM ResBlocks,
downsamplers and upsamplers of `unet.py` (GroupNorm eps 1e-5, no scale-shift
norm, dropout 0), a `SpatialTransformer` after each ResBlock of the levels in
`attention_resolutions` and in the middle, the sinusoidal time embedding with
cos first. Parameter names follow the original (CompVis / Stability) keys by
the rule of `unet.py`: `input_blocks.1.1.transformer_blocks.0.attn1.to_q` ->
`input_blocks_1_1/transformer_blocks_0/attn1/to_q`; `infd_jax.convert.sd`
maps diffusers' names onto these.

SD 1.x: 8 heads everywhere, 1x1-conv projections, context 768 (CLIP ViT-L/14).
SD 2.x: 64 channels per head, linear projections, context 1024 (OpenCLIP
ViT-H/14). Whether the output is eps or v is the checkpoint's training
objective, not an architecture switch (`infd_jax.diffusion.prediction`).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from infd_jax.models import layers
from infd_jax.models.blocks import Upsample
from infd_jax.models.transformer2d import SpatialTransformer
from infd_jax.models.unet import Downsample, ResBlock, timestep_embedding

Dtype = Any
_GN_EPS = 1e-5
_zeros = nn.initializers.zeros_init()


class SDUNet(nn.Module):
  """(x [B, H, W, in_channels], t [B], context [B, M, context_dim]) -> [B, H, W, out_channels].

  Attributes:
    model_channels: base width; the time embedding is 4x this.
    channel_mult: width multiplier per level.
    num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    attention_resolutions: downsampling factors (1, 2, 4, ...) with a SpatialTransformer.
    num_heads: heads per transformer (SD 1.x: 8), used when num_head_channels <= 0.
    num_head_channels: channels per head (SD 2.x: 64); > 0 overrides num_heads.
    context_dim: width of the text context (checked against the input).
    transformer_depth: blocks per SpatialTransformer.
    in_channels / out_channels: latent channels.
    dtype: compute dtype (parameters float32, output float32).
    attention_impl: `jax.nn.dot_product_attention` implementation.
    remat: rematerialise each ResBlock and transformer in the backward pass.
    norm_groups: GroupNorm groups everywhere (32 in SD).
  """
  model_channels: int = 320
  channel_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (4, 2, 1)
  num_heads: int = 8
  num_head_channels: int = -1
  context_dim: int = 768
  transformer_depth: int = 1
  in_channels: int = 4
  out_channels: int = 4
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  remat: bool = False
  norm_groups: int = 32

  def heads(self, channels: int) -> int:
    return channels // self.num_head_channels if self.num_head_channels > 0 else self.num_heads

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"expected {self.in_channels} input channels, got {x.shape}")
    if context.shape[-1] != self.context_dim:
      raise ValueError(f"expected a context of width {self.context_dim}, got {context.shape}")
    mc, dt = self.model_channels, self.dtype
    res_cls = nn.remat(ResBlock) if self.remat else ResBlock
    attn_cls = nn.remat(SpatialTransformer) if self.remat else SpatialTransformer

    def res(out, name):
      return res_cls(out, dtype=dt, norm_groups=self.norm_groups, name=name)

    def attn(h, name):
      return attn_cls(self.heads(h.shape[-1]), self.transformer_depth, dt, self.attention_impl,
                      self.norm_groups, name=name)(h, context)

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
          h = attn(h, f"input_blocks_{block}_1")
        skips.append(h)
        block += 1
      if level != len(self.channel_mult) - 1:
        h = Downsample(dtype=dt, name=f"input_blocks_{block}_0")(h)
        skips.append(h)
        block += 1
        ds *= 2

    ch = h.shape[-1]
    h = res(ch, "middle_block_0")(h, emb)
    h = attn(h, "middle_block_1")
    h = res(ch, "middle_block_2")(h, emb)

    block = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(mult * mc, f"output_blocks_{block}_0")(h, emb)
        sub = 1
        if ds in self.attention_resolutions:
          h = attn(h, f"output_blocks_{block}_1")
          sub += 1
        if level and i == self.num_res_blocks:
          h = Upsample(dtype=dt, name=f"output_blocks_{block}_{sub}")(h)
          ds //= 2
        block += 1

    h = nn.silu(layers.group_norm(_GN_EPS, num_groups=self.norm_groups, dtype=dt, name="out_0")(h))
    h = layers.conv(self.out_channels, 3, in_features=h.shape[-1], dtype=dt, kernel_init=_zeros,
                    bias_init=_zeros, name="out_2")(h)
    return h.astype(jnp.float32)


# The released architectures (LDM configs v1-inference.yaml / v2-inference(-v).yaml).
SD1 = dict(num_heads=8, num_head_channels=-1, context_dim=768)
SD2 = dict(num_heads=-1, num_head_channels=64, context_dim=1024)
