"""Coordinate and cell grids of output pixels, built exactly (the renderer's lookup is in
`models/renderer.py`).

Conventions (REFERENCE.md 3.5.1): coordinates are in [-1, 1], the last axis is
(row, col), grids hold pixel centres `-1 + (2i + 1)/h` and the cell is the pixel
size `(2/h, 2/w)`.

Grids are built on the host in numpy with the official operation order,
`minv + (maxv - minv) * ((0.5 + i) / s)`, in float32 (the official default dtype)
or in float64 (float64 training steps under JAX's x64 mode; the official grids
when its default dtype is float64). numpy's division is IEEE-exact, while
XLA's vectorised CPU division is not (it differed from IEEE in ~60% of the
elements of a 1000-point axis), and the nearest-feature tie rule depends on the
last bit of a coordinate. A window of a virtual image therefore has coordinates
bit-identical to the same crop of the full grid.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

Range = tuple[float, float]


def _axis_ranges(ndim: int, ranges: Range | Sequence[Range]) -> list[Range]:
  if isinstance(ranges[0], (tuple, list)):
    return [tuple(r) for r in ranges]
  return [tuple(ranges)] * ndim


def axis_centers(size: int, start: int = 0, length: int | None = None,
                 value_range: Range = (-1.0, 1.0), dtype: npt.DTypeLike = np.float32) -> np.ndarray:
  """Centres [length] (float32 or float64) of pixels start, start+1, ... of a `size`-pixel axis."""
  length = size - start if length is None else length
  real = np.dtype(dtype).type
  frac = (real(0.5) + np.arange(start, start + length, dtype=real)) / real(size)
  lo, hi = value_range
  return real(lo) + real(hi - lo) * frac


def make_coord_grid(shape: Sequence[int], ranges: Range | Sequence[Range] = (-1.0, 1.0),
                    dtype: npt.DTypeLike = np.float32) -> np.ndarray:
  """Pixel-centre grid over `ranges` (one (min, max) for all axes, or one per axis).

  Returns:
    [*shape, len(shape)] in `dtype`, 'ij' indexing.
  """
  axes = [axis_centers(s, value_range=r, dtype=dtype)
          for s, r in zip(shape, _axis_ranges(len(shape), ranges))]
  return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def make_coord_cell_grid(shape: Sequence[int], ranges: Range | Sequence[Range] = (-1.0, 1.0),
                         batch: int | None = None, dtype: npt.DTypeLike = np.float32
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Coordinate and cell grids, each [*shape, k] (or [batch, *shape, k]) in `dtype`."""
  coord = make_coord_grid(shape, ranges, dtype)
  sizes = [(hi - lo) / s for s, (lo, hi) in zip(shape, _axis_ranges(len(shape), ranges))]
  cell = np.broadcast_to(np.asarray(sizes, dtype), coord.shape)
  if batch is not None:
    coord = np.broadcast_to(coord, (batch, *coord.shape))
    cell = np.broadcast_to(cell, (batch, *cell.shape))
  return coord, cell


def window_coord_cell(full_hw: tuple[int, int], origin: tuple[int, int],
                      window_hw: tuple[int, int], dtype: npt.DTypeLike = np.float32
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Grids [h, w, 2] in `dtype` of the window [r0:r0+h, c0:c0+w] of a virtual full_hw image.

  Equal bit for bit to `make_coord_cell_grid(full_hw, dtype=dtype)[r0:r0+h, c0:c0+w]`.
  """
  rows = axis_centers(full_hw[0], origin[0], window_hw[0], dtype=dtype)
  cols = axis_centers(full_hw[1], origin[1], window_hw[1], dtype=dtype)
  coord = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)
  cell = np.broadcast_to(np.asarray([2 / full_hw[0], 2 / full_hw[1]], dtype), coord.shape)
  return coord, cell


def grid_from_axes(rows: jax.Array, cols: jax.Array) -> jax.Array:
  """Separable grid on device: rows [..., h], cols [..., w] -> coord [..., h, w, 2]."""
  shape = (*rows.shape, cols.shape[-1])
  return jnp.stack([jnp.broadcast_to(rows[..., :, None], shape),
                    jnp.broadcast_to(cols[..., None, :], shape)], axis=-1)


def _pow2(e: jax.Array) -> jax.Array:
  """2.0 ** e as float32, exactly (e an int32 in the normal range)."""
  return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def exact_ratio(p: jax.Array, r: jax.Array) -> jax.Array:
  """p / r rounded once to the nearest float32 (ties to even), for int32 0 <= p <= r < 2**23.

  XLA's float32 division is not correctly rounded on CPU (on a grid of these
  quotients ~28% differ from IEEE) nor on TPU, while the nearest-feature tie
  rule depends on the last bit of a coordinate; so the quotient comes from
  integer long division: 1 + 24 quotient bits, a round bit and a sticky bit.
  """
  p, r = jnp.asarray(p, jnp.int32), jnp.asarray(r, jnp.int32)
  e = jax.lax.clz(p) - jax.lax.clz(r)
  e = jnp.where((p << e) < r, e + 1, e)  # r <= p * 2**e < 2r
  rem, q = (p << e) - r, jnp.ones_like(p)
  for _ in range(3):  # 8 quotient bits at a time: q = floor(p * 2**(e + 24) / r)
    rem = rem << 8
    q, rem = (q << 8) | (rem // r), rem % r
  mant = q >> 1  # 24 significant bits, then the round bit q & 1 and the sticky bit rem != 0
  mant = mant + ((q & 1) & ((rem != 0) | (mant & 1)).astype(jnp.int32))
  return jnp.where(p == 0, 0.0, mant.astype(jnp.float32) * _pow2(-(23 + e)))


def crop_coord_cell(crop: jax.Array, patch: int) -> tuple[jax.Array, jax.Array]:
  """Coordinate and cell grids [B, P, P, 2] of training crops, built on the device.

  Args:
    crop: [B, 3] int32 (r, ii, jj): the window at row ii, column jj of the
      image resized to r x r (REFERENCE.md 5.4).
    patch: P.

  Returns:
    coord[b, a, c] = (2 * (ii + a + 0.5) / r - 1, 2 * (jj + c + 0.5) / r - 1) and
    cell = 2 / r, float32 and rounded once, as `transforms.patch_coord` / `patch_cell`.
  """
  crop = crop.astype(jnp.int32)
  r = crop[:, :1]

  def axis(origin):  # (2 (o + a) + 1 - r) / r, the closed form with one rounding
    n = 2 * (origin + jnp.arange(patch, dtype=jnp.int32)) + 1 - r
    return jnp.sign(n).astype(jnp.float32) * exact_ratio(jnp.abs(n), r)

  coord = grid_from_axes(axis(crop[:, 1:2]), axis(crop[:, 2:3]))
  cell = jnp.broadcast_to((2 * exact_ratio(1, r))[:, :, None, None], coord.shape)
  return coord, cell
