"""INFD stage-1 autoencoder: VQGAN encoder, vector quantizer, headless decoder, CLIF renderer.

Naming rule (PyTorch state-dict key -> Flax param path, REFERENCE.md 10.2):
  * The `nn.Sequential` wrappers disappear: `encoder.0.<k>` -> `encoder/<k>`,
    `encoder.1` -> `encoder/quant_conv`, `decoder.0` -> `decoder/post_quant_conv`,
    `decoder.1.<k>` -> `decoder/<k>`, `renderer.net.<k>` -> `renderer/<k>`.
  * Inside, the dotted container path up to a block joins with "_" into one
    module name and the block's own layers stay children:
    `down.1.block.0.conv1` -> `down_1_block_0/conv1`,
    `down.0.downsample.conv` -> `down_0_downsample/conv`,
    `mid.block_1.norm1` -> `mid_block_1/norm1`, `mid.attn_1.q` -> `mid_attn_1/q`,
    `up.2.upsample.conv` -> `up_2_upsample/conv`, `model.1.conv2` -> `model_1/conv2`.
  * `.weight` -> `kernel` (conv, layout per REFERENCE.md 10.3) or `scale` (GroupNorm);
    `.bias` -> `bias`; `quantizer.embedding.weight` -> `quantizer/embedding`.
Activations are NHWC.
"""

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from infd_jax.models import layers
from infd_jax.models.blocks import AttnBlock, Downsample, GN_EPS, ResnetBlock, Upsample, swish
from infd_jax.models.quantizer import VectorQuantizer, VQOutput
from infd_jax.models.renderer import CLIFRenderer

Dtype = Any


class Encoder(nn.Module):
  """VQGAN encoder plus the extra 1x1 conv: [B, H, W, 3] -> z [B, H/f, W/f, z_channels].

  z is in full precision (`layers.full_precision`: float32 under bfloat16 compute).

  f = 2 ** (len(ch_mult) - 1); 4 for the official (1, 2, 4).
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 3
  dtype: Dtype = jnp.float32
  norm_groups: int = 32
  mid_attention: bool = True  # False: the official attn_type="none" (no self-attention)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.conv(self.ch, 3, in_features=x.shape[-1], dtype=self.dtype, name="conv_in")(x)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = ResnetBlock(self.ch * mult, dtype=self.dtype, norm_groups=self.norm_groups,
                        name=f"down_{level}_block_{i}")(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample(dtype=self.dtype, name=f"down_{level}_downsample")(h)
    h = _middle(h, self.dtype, self.norm_groups, self.mid_attention)
    h = swish(layers.group_norm(GN_EPS, num_groups=self.norm_groups, dtype=self.dtype,
                                name="norm_out")(h))
    # The two output convs are tiny; full precision keeps z (the VQ argmin input and
    # the diffusion model's data) exact under bfloat16 compute.
    full = layers.full_precision(self.dtype)
    h = layers.conv(self.z_channels, 3, in_features=h.shape[-1], dtype=full,
                    name="conv_out")(h.astype(full))
    return layers.conv(self.z_channels, 1, in_features=self.z_channels, dtype=full,
                       name="quant_conv")(h)


class Decoder(nn.Module):
  """1x1 post-quant conv plus the VQGAN decoder, by default without its output head.

  [B, h, w, z_channels] -> phi [B, h*f, w*f, ch * ch_mult[0]], the raw output of
  the last ResnetBlock (no norm, no activation). With `out_channels` > 0 the
  LDM decoder's head follows (`norm_out`, swish, `conv_out`): -> [B, h*f, w*f,
  out_channels], e.g. Stable Diffusion's image decoder.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 3
  dtype: Dtype = jnp.float32
  norm_groups: int = 32
  mid_attention: bool = True  # False: the official attn_type="none" (no self-attention)
  out_channels: int = 0  # 0: headless (INFD's phi); > 0: the LDM output head

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    h = layers.conv(self.z_channels, 1, in_features=z.shape[-1], dtype=self.dtype,
                    name="post_quant_conv")(z)
    h = layers.conv(self.ch * self.ch_mult[-1], 3, in_features=self.z_channels,
                    dtype=self.dtype, name="conv_in")(h)
    h = _middle(h, self.dtype, self.norm_groups, self.mid_attention)
    # `up` is indexed by level; the lowest resolution (last level) runs first.
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = ResnetBlock(self.ch * self.ch_mult[level], dtype=self.dtype,
                        norm_groups=self.norm_groups, name=f"up_{level}_block_{i}")(h)
      if level != 0:
        h = Upsample(dtype=self.dtype, name=f"up_{level}_upsample")(h)
    if self.out_channels:
      h = swish(layers.group_norm(GN_EPS, num_groups=self.norm_groups, dtype=self.dtype,
                                  name="norm_out")(h))
      h = layers.conv(self.out_channels, 3, in_features=h.shape[-1], dtype=self.dtype,
                      name="conv_out")(h)
    return h


def _middle(h: jax.Array, dtype: Dtype, groups: int, attention: bool) -> jax.Array:
  """The `mid` stage shared by encoder and decoder: ResnetBlock, AttnBlock (unless
  `attention` is off), ResnetBlock."""
  c = h.shape[-1]
  h = ResnetBlock(c, dtype=dtype, norm_groups=groups, name="mid_block_1")(h)
  if attention:
    h = AttnBlock(dtype=dtype, norm_groups=groups, name="mid_attn_1")(h)
  return ResnetBlock(c, dtype=dtype, norm_groups=groups, name="mid_block_2")(h)


@flax.struct.dataclass
class AEOutput:
  """pred: [B, h, w, 3] RGB at the query grid; z / z_q: [B, H/f, W/f, D]; quant_loss: scalar."""
  pred: jax.Array
  z: jax.Array
  z_q: jax.Array
  quant_loss: jax.Array
  indices: jax.Array


class INFDAutoencoder(nn.Module):
  """Encoder -> quantizer -> decoder -> CLIF renderer (REFERENCE.md 3).

  Submodules `encoder`, `quantizer`, `decoder`, `renderer` match the top-level
  state-dict prefixes (which also name the official optimizer groups).
  Params are float32 (float64 for a float64 `dtype`); `dtype` is the compute dtype of
  the convolutions.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 3
  num_codes: int = 8192  # 0: no quantizer (the official quantizer=False); z goes straight on
  vq_beta: float = 0.25
  renderer_hidden: int = 256
  codebook_init: float = 0.0  # 0: the official U(-1/N, 1/N); see VectorQuantizer
  norm_groups: int = 32  # GroupNorm groups everywhere (32: official; the demo uses fewer)
  renderer_normalize: bool = True  # False: no GroupNorm in the renderer (tile-independent)
  mid_attention: bool = True  # False: no self-attention in encoder and decoder (attn_type="none")
  # True: a KL encoder (Stable Diffusion's) whose conv_out / quant_conv give the posterior's
  # mean and log-variance (2 z_channels); `encode` returns the mean.
  kl_encoder: bool = False
  # The decoder's levels when they differ from the encoder's (empty: ch_mult, as officially).
  # More levels than the encoder upsample phi beyond the input size: (1, 1) after an f1
  # encoder gives phi at twice the input, so each feature cell covers half the pixels.
  decoder_ch_mult: Sequence[int] = ()
  # A fixed affine map of each input pixel's RGB before the encoder: 12 numbers, a 3 x 3
  # matrix (row-major) then 3 offsets; empty: none (official). A colour-whitening map gives
  # the encoder every colour direction at equal variance (see `colour_whitening`).
  input_colour: Sequence[float] = ()
  dtype: Dtype = jnp.float32

  def setup(self):
    arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                z_channels=self.z_channels, dtype=self.dtype, norm_groups=self.norm_groups,
                mid_attention=self.mid_attention)
    self.encoder = Encoder(**(arch | dict(z_channels=2 * self.z_channels) if self.kl_encoder
                              else arch))
    self.quantizer = (VectorQuantizer(self.num_codes, self.z_channels, self.vq_beta,
                                      self.codebook_init, layers.full_precision(self.dtype))
                      if self.num_codes else None)
    decoder_mult = tuple(self.decoder_ch_mult or self.ch_mult)
    self.decoder = Decoder(**(arch | dict(ch_mult=decoder_mult)))
    self.renderer = CLIFRenderer(feat_channels=self.ch * decoder_mult[0],
                                 hidden=self.renderer_hidden, dtype=self.dtype,
                                 norm_groups=self.norm_groups,
                                 normalize=self.renderer_normalize)

  def encode(self, x: jax.Array) -> jax.Array:
    """Image [B, H, W, 3] in [-1, 1] -> pre-quantization z [B, H/f, W/f, D]."""
    if self.input_colour:
      affine = jnp.asarray(self.input_colour, x.dtype)
      x = x @ affine[:9].reshape(3, 3).T + affine[9:]
    z = self.encoder(x)
    return z[..., :self.z_channels] if self.kl_encoder else z

  def quantize(self, z: jax.Array) -> VQOutput:
    """Nearest codes with straight-through gradient and the legacy VQ loss; without a
    quantizer, z itself (full precision) with loss 0 and every index 0."""
    if self.quantizer is None:
      full = layers.full_precision(z.dtype)
      return VQOutput(z_q=z.astype(full), loss=jnp.zeros((), full),
                      indices=jnp.zeros(z.shape[:-1], jnp.int32))
    return self.quantizer(z)

  def decode(self, z_q: jax.Array) -> jax.Array:
    """Quantized z [B, h, w, D] -> feature map phi [B, h*u, w*u, ch*m[0]]: m the decoder's
    levels (`decoder_ch_mult`, else `ch_mult`), u = 2 ** (len(m) - 1)."""
    return self.decoder(z_q)

  def decode_latents(self, z: jax.Array, quantize: bool = True) -> jax.Array:
    """Sampled or encoded z -> phi as sampling decodes it (REFERENCE.md 7, step 2): quantized
    (straight-through) first unless `quantize` is False, then decoded."""
    return self.decode(self.quantize(z).z_q if quantize else z)

  def render(self, phi: jax.Array, coord: jax.Array, cell: jax.Array) -> jax.Array:
    """RGB [B, gh, gw, 3] at the query grid coord/cell [B, gh, gw, 2] (one renderer call)."""
    return self.renderer(phi, coord, cell)

  def render_features(self, phi: jax.Array, coord: jax.Array, cell: jax.Array) -> jax.Array:
    """The renderer up to (not including) conv_out: -> [B, gh, gw, renderer_hidden]."""
    return self.renderer.features(phi, coord, cell)

  def render_head(self, h: jax.Array) -> jax.Array:
    """The renderer's last conv: render_features output -> RGB [B, gh, gw, 3], full precision."""
    return self.renderer.head(h)

  def __call__(self, inp: jax.Array, coord: jax.Array, cell: jax.Array) -> AEOutput:
    """Full stage-1 forward: inp [B, H, W, 3] and a query grid [B, gh, gw, 2]."""
    z = self.encode(inp)
    vq = self.quantize(z)
    pred = self.render(self.decode(vq.z_q), coord, cell)
    return AEOutput(pred=pred, z=z, z_q=vq.z_q, quant_loss=vq.loss, indices=vq.indices)
