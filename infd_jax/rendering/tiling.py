"""Rendering whole images and windows of any size with the official tiling (REFERENCE 7).

The official `render_output_patchwise` walks the output in tile x tile steps
(256), renders each tile with up to `pad` (8) pixels of context on each side
that exists, and keeps the centre. Each tile is one renderer call, so the
renderer's GroupNorm statistics are per padded tile; reproducing the tiling is
what makes outputs match the official samples.

Here tiles are grouped by padded shape (interior / edge / corner classes),
each class is rendered in batched calls of a fixed number of tiles (`vmap`
over tiles, phi shared), and the kept centres are assembled on the host. Each
jitted call takes the tiles' coordinate axes (built exactly on the host, see
`coords`) as arrays, so the compiled functions depend only on the tile shapes,
not on the resolution or the tile positions. The network is an argument
`render_fn(params, phi, coord, cell) -> [B, h, w, 3]`, e.g.
`module_render_fn(model, "render")`, so this file knows nothing about it.
"""

import collections
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infd_jax.rendering import coords

PyTree = Any
RenderFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]
Window = tuple[int, int, int, int]  # (top, left, height, width) in output pixels


def module_render_fn(module: nn.Module, method: Callable | str | None = None) -> RenderFn:
  """Adapts a linen module (or one of its methods) taking (phi, coord, cell) to a RenderFn."""
  def render_fn(params, phi, coord, cell):
    return module.apply(params, phi, coord, cell, method=method)
  return render_fn


@dataclasses.dataclass(frozen=True)
class Tile:
  """One official tile: the padded input window and the kept centre, in output pixels."""
  in_origin: tuple[int, int]   # top-left of the padded input tile
  in_hw: tuple[int, int]       # padded input size (the renderer call's grid)
  out_origin: tuple[int, int]  # top-left of the kept centre (x0, y0)
  out_hw: tuple[int, int]      # kept centre size (xl, yl)


def _axis_tiles(size: int, tile: int, pad: int) -> list[tuple[int, int, int, int]]:
  """Per-axis (start, length, pad_before, pad_after), as the official loop computes them."""
  out = []
  for x0 in range(0, size, tile):
    xl = min(tile, size - x0)
    out.append((x0, xl, min(pad, x0), min(pad, size - (x0 + xl))))
  return out


def official_tiles(out_hw: tuple[int, int], tile: int = 256, pad: int = 8) -> list[Tile]:
  """All tiles of an out_hw image in the official order (rows outer, columns inner)."""
  tiles = []
  for x0, xl, xpl, xpr in _axis_tiles(out_hw[0], tile, pad):
    for y0, yl, ypl, ypr in _axis_tiles(out_hw[1], tile, pad):
      tiles.append(Tile(in_origin=(x0 - xpl, y0 - ypl), in_hw=(xpl + xl + xpr, ypl + yl + ypr),
                        out_origin=(x0, y0), out_hw=(xl, yl)))
  return tiles


def _render_tiles(render_fn: RenderFn, params: PyTree, phi: jax.Array, rows: jax.Array,
                  cols: jax.Array, cell: jax.Array) -> jax.Array:
  """Renders n same-shape tiles given their coordinate axes rows [n, h], cols [n, w].

  cell: [2] pixel size of the virtual image. Returns [n, B, h, w, 3].
  """
  batch = phi.shape[0]

  def one(r, c):
    coord = coords.grid_from_axes(r, c)
    shape = (batch, *coord.shape)
    return render_fn(params, phi, jnp.broadcast_to(coord, shape), jnp.broadcast_to(cell, shape))

  return jax.vmap(one)(rows, cols)


class TiledRenderer:
  """Renders images or windows of images from phi with the official tiling.

  Keep one instance per render_fn: compiled functions are cached on it, one per
  (tile shape, tiles per call, phi shape) and shared across resolutions.

  Attributes:
    render_fn: the network, `(params, phi, coord, cell) -> [B, h, w, 3]`.
    tile: tile size (official 256).
    pad: context pixels on each side (official 8; >= the net's receptive radius 6).
    tiles_per_call: tiles rendered together in one batched call; bounds memory
      at about tiles_per_call * B padded tiles of activations.
  """

  def __init__(self, render_fn: RenderFn, tile: int = 256, pad: int = 8, tiles_per_call: int = 4):
    self.render_fn = render_fn
    self.tile, self.pad, self.tiles_per_call = tile, pad, tiles_per_call
    self._tiles_fn = jax.jit(functools.partial(_render_tiles, render_fn))
    self._grid_fn = jax.jit(render_fn)

  def render_grid(self, params: PyTree, phi: jax.Array, coord: jax.Array, cell: jax.Array
                  ) -> jax.Array:
    """One untiled renderer call on a query grid [B, h, w, 2] -> [B, h, w, 3]."""
    return self._grid_fn(params, phi, coord, cell)

  def render_image(self, params: PyTree, phi: jax.Array, out_hw: tuple[int, int],
                   window: Window | None = None) -> np.ndarray:
    """Official tiled rendering of an out_hw image, or of a window of it.

    Args:
      params: variables for render_fn.
      phi: [B, Hf, Wf, C] decoded feature map.
      out_hw: (H, W) of the full virtual image (any size, need not be square).
      window: (top, left, h, w) of the part to return; only tiles overlapping it
        are rendered, and the result equals the same crop of the full image.

    Returns:
      [B, h, w, 3] float32 numpy array (h, w = out_hw when window is None).
    """
    top, left, h, w = window or (0, 0, *out_hw)
    if not (0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= out_hw[0]
            and left + w <= out_hw[1]):
      raise ValueError(f"window {window} is not inside the {out_hw} image")
    out = np.zeros((phi.shape[0], h, w, 3), np.float32)
    cell = jnp.asarray([2 / out_hw[0], 2 / out_hw[1]], jnp.float32)
    groups = collections.defaultdict(list)
    for t in official_tiles(out_hw, self.tile, self.pad):
      if _overlap(t, (top, left, h, w)) is not None:
        groups[t.in_hw].append(t)
    pending = []
    for in_hw, tiles in groups.items():
      n = min(self.tiles_per_call, len(tiles))
      for i in range(0, len(tiles), n):
        chunk = tiles[i:i + n]
        # Pad the last chunk by repeating a tile so every call of a class has one shape.
        padded = chunk + [chunk[-1]] * (n - len(chunk))
        rows = np.stack([coords.axis_centers(out_hw[0], t.in_origin[0], in_hw[0]) for t in padded])
        cols = np.stack([coords.axis_centers(out_hw[1], t.in_origin[1], in_hw[1]) for t in padded])
        pending.append((chunk, self._tiles_fn(params, phi, rows, cols, cell)))
        # Copy the previous chunk while this one runs on the device.
        if len(pending) > 1:
          self._paste(out, *pending.pop(0), (top, left, h, w))
    for chunk, result in pending:
      self._paste(out, chunk, result, (top, left, h, w))
    return out

  @staticmethod
  def _paste(out: np.ndarray, chunk: list[Tile], result: jax.Array, window: Window) -> None:
    result = np.asarray(jax.device_get(result), np.float32)
    for t, img in zip(chunk, result):
      (r0, r1), (c0, c1) = _overlap(t, window)
      # Kept centre starts at out_origin - in_origin inside the padded tile.
      ir, ic = r0 - t.in_origin[0], c0 - t.in_origin[1]
      out[:, r0 - window[0]:r1 - window[0], c0 - window[1]:c1 - window[1]] = (
          img[:, ir:ir + r1 - r0, ic:ic + c1 - c0])


def _overlap(t: Tile, window: Window) -> tuple[tuple[int, int], tuple[int, int]] | None:
  """Row and column ranges (output pixels) where a tile's kept centre meets the window."""
  (tr, tc), (th, tw) = t.out_origin, t.out_hw
  top, left, h, w = window
  r0, r1 = max(tr, top), min(tr + th, top + h)
  c0, c1 = max(tc, left), min(tc + tw, left + w)
  if r0 >= r1 or c0 >= c1:
    return None
  return (r0, r1), (c0, c1)


def window_grid(out_hw: tuple[int, int], window: Window, batch: int) -> tuple[jax.Array, jax.Array]:
  """Query grid (coord, cell) [batch, h, w, 2] of a window of a virtual out_hw image.

  For single-call rendering of a crop, as in training (global coordinates, cell 2/H).
  """
  top, left, h, w = window
  coord, cell = coords.window_coord_cell(out_hw, (top, left), (h, w))
  shape = (batch, h, w, 2)
  return jnp.broadcast_to(jnp.asarray(coord), shape), jnp.broadcast_to(jnp.asarray(cell), shape)

