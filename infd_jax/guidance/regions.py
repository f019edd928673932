"""Differentiable rendering of one window of a virtual image, exactly as the tiled render.

The full render of a virtual H x W image is the official tiling (`tiling.official_tiles`):
each tile is one renderer call on its padded grid, so a pixel depends on the
tile it falls in (the renderer's GroupNorm statistics are per padded tile).
`render_window` renders only the tiles whose kept centre meets the window, at
their exact host-built coordinates, and keeps their centres, so the result is
that window of the full render while costing what the window costs, whatever
H x W is. Tiles of one padded shape go through `lax.map` with a rematerialised
body: the backward pass holds one tile's activations at a time.
"""

import collections
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from infd_jax.rendering import coords, tiling

PyTree = Any
Window = tuple[int, int, int, int]  # (top, left, height, width) in pixels of the virtual image


def _axis_tiles(size: int, start: int, length: int, tile: int, pad: int
                ) -> list[tuple[int, int, int, int]]:
  """(in_start, in_len, keep_from, keep_to) of the tiles of one axis meeting [start, start+len)."""
  out = []
  for x0 in range(start // tile * tile, start + length, tile):
    xl = min(tile, size - x0)
    before, after = min(pad, x0), min(pad, size - (x0 + xl))
    out.append((x0 - before, before + xl + after, max(x0, start), min(x0 + xl, start + length)))
  return out


def check_window(out_hw: tuple[int, int], window: Window) -> None:
  top, left, h, w = window
  if not (0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= out_hw[0]
          and left + w <= out_hw[1]):
    raise ValueError(f"box {window} is not inside the {out_hw[0]}x{out_hw[1]} image")


def render_window(render_fn: tiling.RenderFn, params: PyTree, phi: jax.Array,
                  out_hw: tuple[int, int], window: Window, tile: int = 256, pad: int = 8
                  ) -> jax.Array:
  """RGB [B, h, w, 3] of `window` of the tiled render of a virtual out_hw image.

  Traceable and differentiable in phi (and params); out_hw, window, tile and
  pad are static. Equal (to float rounding) to
  `TiledRenderer(render_fn, tile, pad).render_image(params, phi, out_hw, window)`.
  """
  check_window(out_hw, window)
  top, left, h, w = window
  cell = jnp.asarray([2 / out_hw[0], 2 / out_hw[1]], jnp.float32)
  groups = collections.defaultdict(list)
  for r in _axis_tiles(out_hw[0], top, h, tile, pad):
    for c in _axis_tiles(out_hw[1], left, w, tile, pad):
      groups[r[1], c[1]].append((r, c))

  @jax.checkpoint
  def one(axes):
    rows, cols = axes
    coord = coords.grid_from_axes(rows, cols)
    shape = (phi.shape[0], *coord.shape)
    return render_fn(params, phi, jnp.broadcast_to(coord, shape), jnp.broadcast_to(cell, shape))

  pieces = []
  for (th, tw), tiles in groups.items():
    rows = np.stack([coords.axis_centers(out_hw[0], r[0], th) for r, _ in tiles])
    cols = np.stack([coords.axis_centers(out_hw[1], c[0], tw) for _, c in tiles])
    rendered = jax.lax.map(one, (jnp.asarray(rows), jnp.asarray(cols)))
    for k, (r, c) in enumerate(tiles):
      img = rendered[k, :, r[2] - r[0]:r[3] - r[0], c[2] - c[0]:c[3] - c[0]]
      pieces.append(((r[2] - top, c[2] - left), img))
  out = jnp.zeros((phi.shape[0], h, w, 3), jnp.float32)
  for (r0, c0), img in pieces:
    out = jax.lax.dynamic_update_slice(out, img.astype(jnp.float32), (0, r0, c0, 0))
  return out
