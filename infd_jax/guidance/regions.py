"""Differentiable rendering of one window of a virtual image, exactly as the tiled render.

The full render of a virtual H x W image is the official tiling (`tiles.official_tiles`):
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
from infd_jax.rendering import tiles as tiles_lib

PyTree = Any


def render_window(render_fn: tiling.RenderFn, params: PyTree, phi: jax.Array,
                  out_hw: tuple[int, int], window: tiles_lib.Window, tile: int = 256, pad: int = 8
                  ) -> jax.Array:
  """RGB [B, h, w, 3] of `window` of the tiled render of a virtual out_hw image.

  Traceable and differentiable in phi (and params); out_hw, window, tile and
  pad are static. Equal (to float rounding) to
  `TiledRenderer(render_fn, tile, pad).render_image(params, phi, out_hw, window)`.
  """
  tiles_lib.check_window(out_hw, window, "box")
  cell = jnp.asarray([2 / out_hw[0], 2 / out_hw[1]], jnp.float32)
  groups = collections.defaultdict(list)
  for t in tiles_lib.official_tiles(out_hw, tile, pad, window):
    groups[t.in_hw].append(t)
  one = jax.checkpoint(lambda axes: tiling.render_tile(render_fn, params, phi, *axes, cell))
  out = jnp.zeros((phi.shape[0], window[2], window[3], 3), jnp.float32)
  for (th, tw), group in groups.items():
    rows = np.stack([coords.axis_centers(out_hw[0], t.in_origin[0], th) for t in group])
    cols = np.stack([coords.axis_centers(out_hw[1], t.in_origin[1], tw) for t in group])
    rendered = jax.lax.map(one, (jnp.asarray(rows), jnp.asarray(cols)))
    for k, t in enumerate(group):
      src_rows, src_cols, top, left = t.piece(window)
      piece = rendered[k, :, src_rows, src_cols].astype(jnp.float32)
      out = jax.lax.dynamic_update_slice(out, piece, (0, top, left, 0))
  return out
