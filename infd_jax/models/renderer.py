"""CLIF renderer: nearest-feature lookup followed by a small CNN on the query grid.

Official modules: `renderer_concat_wrapper` + `simple_renderer_net` (REFERENCE.md 3.5).
Queries are (row, col) pixel centres in [-1, 1] with the pixel size as cell
(`rendering/coords.py` builds such grids; REFERENCE.md 3.5.1).

Naming rule: `renderer.net.<k>` -> `renderer/<k>` with `model.<i>` joined as
`model_<i>`: `model.0` -> `model_0` (conv3x3 132 -> hidden), `model.1` /
`model.2` -> `model_1` / `model_2` (ResnetBlocks with norm1, conv1, norm2,
conv2), then `norm_out` and `conv_out` (the last layer for the adaptive GAN weight).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from infd_jax.models import layers
from infd_jax.models.blocks import ResnetBlock, group_norm_or_identity, swish

Dtype = Any


def nearest_index(c: jax.Array, size: int, dtype: Dtype = jnp.float32) -> jax.Array:
  """Index of the feature cell nearest to coordinate c on an axis of `size` cells.

  Uses PyTorch's CUDA grid_sample(nearest, align_corners=False) formula
  `((c + 1) * size - 1) / 2` in `dtype` with round-half-to-even, so exact cell
  boundaries pick the even index (on 4 cells: -0.5 -> 0, 0.0 -> 2, 0.5 -> 2).
  """
  u = ((c.astype(dtype) + 1.0) * size - 1.0) / 2.0
  return jnp.round(u).astype(jnp.int32)


def lookup_nearest(feat: jax.Array, coord: jax.Array, cell: jax.Array,
                   dtype: Dtype = jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Nearest-feature lookup with relative coordinate and cell (REFERENCE.md 3.5.2).

  Args:
    feat: [B, Hf, Wf, C] feature map.
    coord: [B, h, w, 2] query coordinates (row, col).
    cell: [B, h, w, 2] query pixel sizes (row, col).
    dtype: of the coordinate arithmetic: float32, or float64 in a float64 step
      (x64 mode), where the official code's feature-centre grid is float64 too.

  Returns:
    q_feat [B, h, w, C] (zeros for queries outside the map, as grid_sample's
    zero padding), rel_coord [B, h, w, 2] = (coord - q_coord) * (Hf, Wf) and
    rel_cell [B, h, w, 2] = cell * (Hf, Wf), both in `dtype`.
  """
  b, hf, wf, c = feat.shape
  coord = coord.astype(dtype)
  kr, kc = nearest_index(coord[..., 0], hf, dtype), nearest_index(coord[..., 1], wf, dtype)
  valid = (kr >= 0) & (kr < hf) & (kc >= 0) & (kc < wf)
  flat = jnp.where(valid, kr * wf + kc, 0).reshape(b, -1)
  q_feat = jax.vmap(lambda f, i: jnp.take(f, i, axis=0))(feat.reshape(b, hf * wf, c), flat)
  q_feat = jnp.where(valid[..., None], q_feat.reshape(*coord.shape[:-1], c), 0)
  sizes = jnp.asarray([hf, wf], dtype)
  k = jnp.stack([kr, kc], axis=-1).astype(dtype)
  # Official q_coord is a nearest sample of the centre grid: zero when out of range.
  q_coord = jnp.where(valid[..., None], -1.0 + 2.0 * ((0.5 + k) / sizes), 0.0)
  rel_coord = (coord - q_coord) * sizes
  rel_cell = cell.astype(dtype) * sizes
  return q_feat, rel_coord, rel_cell


def renderer_input(feat: jax.Array, coord: jax.Array, cell: jax.Array,
                   dtype: Dtype = jnp.float32) -> jax.Array:
  """[q_feat | rel_coord (row, col) | rel_cell (row, col)] -> [B, h, w, C + 4] in `dtype`
  (float32, or float64 in a float64 step)."""
  q_feat, rel_coord, rel_cell = lookup_nearest(feat, coord, cell, dtype)
  return jnp.concatenate([q_feat.astype(dtype), rel_coord, rel_cell], axis=-1)


class CLIFRenderer(nn.Module):
  """phi [B, Hf, Wf, C] + query grid (coord, cell) [B, h, w, 2] -> RGB [B, h, w, 3] float32.

  The CNN runs on the query grid with zero padding at its borders, and its
  GroupNorms take statistics over the whole grid passed in, so a pixel's value
  depends on the grid (tile) it is rendered in. The output is unbounded (no
  tanh, no clamp), in the [-1, 1] image convention. `features` and `head` split
  the net before its last conv (the adaptive GAN weight differentiates there).

  Attributes:
    feat_channels: channels C of phi (the decoder's ch * ch_mult[0] = 128).
    hidden: width of the net (256).
    num_blocks: ResnetBlocks after the input conv (2).
    normalize: the official net's `normalize` switch. False drops every
      GroupNorm, so a pixel depends only on its 13 x 13 neighbourhood and tiled
      rendering equals one pass over the whole grid (no seams at any tile size).
  """
  feat_channels: int = 128
  hidden: int = 256
  out_channels: int = 3
  num_blocks: int = 2
  dtype: Dtype = jnp.float32
  norm_groups: int = 32
  normalize: bool = True

  def setup(self):
    self.model_0 = layers.conv(self.hidden, 3, in_features=self.feat_channels + 4,
                               dtype=self.dtype)
    self.blocks = [ResnetBlock(self.hidden, dtype=self.dtype, norm_groups=self.norm_groups,
                               normalize=self.normalize, name=f"model_{i}")
                   for i in range(1, self.num_blocks + 1)]
    self.norm_out = group_norm_or_identity(self.normalize, self.norm_groups, self.dtype)
    self.conv_out = layers.conv(self.out_channels, 3, in_features=self.hidden, dtype=self.dtype)

  def features(self, phi: jax.Array, coord: jax.Array, cell: jax.Array) -> jax.Array:
    """Everything before conv_out: -> [B, h, w, hidden] in the compute dtype."""
    h = self.model_0(renderer_input(phi, coord, cell, layers.full_precision(self.dtype)))
    for block in self.blocks:
      h = block(h)
    return swish(self.norm_out(h))

  def head(self, h: jax.Array) -> jax.Array:
    """The last conv: [B, h, w, hidden] -> RGB [B, h, w, 3] in full precision."""
    # Losses and uint8 export want full precision.
    return self.conv_out(h).astype(layers.full_precision(self.dtype))

  def __call__(self, phi: jax.Array, coord: jax.Array, cell: jax.Array) -> jax.Array:
    return self.head(self.features(phi, coord, cell))
