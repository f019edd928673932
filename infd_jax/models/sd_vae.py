"""Stable Diffusion's KL-f8 autoencoder (LDM `AutoencoderKL`), NHWC.

The LDM encoder and decoder are the VQGAN ones of `autoencoder.py` (GroupNorm
eps 1e-6, single-head mid attention, asymmetric-pad downsampling): the encoder
ends in `conv_out` and `quant_conv` with 2 * z_channels outputs (the mean and
log-variance of the posterior), the decoder begins with `post_quant_conv` and
ends in the output head. Parameter names follow the original keys with the
`quant_conv` / `post_quant_conv` moved inside `encoder` / `decoder`:
`first_stage_model.encoder.down.1.block.0.conv1` -> `encoder/down_1_block_0/conv1`,
`first_stage_model.quant_conv` -> `encoder/quant_conv`.

Latents here are the posterior mean, unscaled; SD's diffusion models see them
times a scaling factor (0.18215 for SD 1.x / 2.x: `infd_jax.convert.sd`
records it).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from infd_jax.models.autoencoder import Decoder, Encoder

Dtype = Any


class KLAutoencoder(nn.Module):
  """`encode`: image [B, H, W, 3] in [-1, 1] -> (mean, logvar) [B, H/f, W/f, z_channels];
  `decode`: latent -> image [B, H, W, 3]; f = 2 ** (len(ch_mult) - 1)."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 4
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  def setup(self):
    arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                dtype=self.dtype, norm_groups=self.norm_groups)
    self.encoder = Encoder(z_channels=2 * self.z_channels, **arch)
    self.decoder = Decoder(z_channels=self.z_channels, out_channels=3, **arch)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The posterior's mean and log-variance (clipped to [-30, 20] as LDM does), float32."""
    mean, logvar = jnp.split(self.encoder(x).astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Reconstruction from the posterior mean."""
    return self.decode(self.encode(x)[0])
