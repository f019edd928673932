"""Rendering whole images and windows of any size with the official tiling (REFERENCE.md 7).

Each tile (`tiles.official_tiles`) is one renderer call on its padded grid, so
the renderer's GroupNorm statistics are per padded tile; reproducing the
tiling is what makes outputs match the official samples.

Here tiles of one padded shape (interior / edge / corner classes) are
rendered in batched calls (a loop over tiles, phi shared), and the kept
centres are assembled on the host, or streamed in raster order (`stream`).
With phi sharded over a mesh's batch axes each device renders its own images;
with fewer images than devices each call's tiles are spread over the mesh. Each
jitted call takes the tiles' coordinate axes (built exactly on the host, see
`coords`) as arrays, so the compiled functions depend only on the tile shapes,
not on the resolution or the tile positions. The network is an argument
`render_fn(params, phi, coord, cell) -> [B, h, w, 3]`, e.g.
`module_render_fn(model, "render")`, so this file knows nothing about it.
"""

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from infd_jax.rendering import coords
from infd_jax.rendering import tiles as tiles_lib

PyTree = Any
RenderFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]


def module_render_fn(module: nn.Module, method: Callable | str | None = None) -> RenderFn:
  """Adapts a linen module (or one of its methods) taking (phi, coord, cell) to a RenderFn."""
  def render_fn(params, phi, coord, cell):
    return module.apply(params, phi, coord, cell, method=method)
  return render_fn


def render_tile(render_fn: RenderFn, params: PyTree, phi: jax.Array, rows: jax.Array,
                cols: jax.Array, cell: jax.Array) -> jax.Array:
  """One renderer call on the grid of a tile's coordinate axes rows [h], cols [w].

  cell: [2] pixel size of the virtual image. Returns [B, h, w, 3].
  """
  coord = coords.grid_from_axes(rows, cols)
  shape = (phi.shape[0], *coord.shape)
  return render_fn(params, phi, jnp.broadcast_to(coord, shape), jnp.broadcast_to(cell, shape))


def _render_tiles(render_fn: RenderFn, params: PyTree, phi: jax.Array, rows: jax.Array,
                  cols: jax.Array, cell: jax.Array) -> jax.Array:
  """Renders n same-shape tiles given their coordinate axes rows [n, h], cols [n, w].

  The tiles run one after another (`lax.map`), each as the same computation, so
  a tile's pixels do not depend on which call or how many tiles it came with
  (a window equals the crop of the full image bit for bit, streamed or not).

  cell: [2] pixel size of the virtual image. Returns [n, B, h, w, 3].
  """
  return jax.lax.map(lambda rc: render_tile(render_fn, params, phi, *rc, cell), (rows, cols))


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
    self._tiles_fns: dict[Any, Callable] = {}
    self._grid_fn = jax.jit(render_fn)

  def render_grid(self, params: PyTree, phi: jax.Array, coord: jax.Array, cell: jax.Array
                  ) -> jax.Array:
    """One untiled renderer call on a query grid [B, h, w, 2] -> [B, h, w, 3]."""
    return self._grid_fn(params, phi, coord, cell)

  def render_image(self, params: PyTree, phi: jax.Array, out_hw: tuple[int, int],
                   window: tiles_lib.Window | None = None) -> np.ndarray:
    """Official tiled rendering of an out_hw image, or of a window of it.

    Args:
      params: variables for render_fn.
      phi: [B, Hf, Wf, C] decoded feature map, every row held by this process.
      out_hw: (H, W) of the full virtual image (any size, need not be square).
      window: (top, left, h, w) of the part to return; only tiles overlapping it
        are rendered, and the result equals the same crop of the full image.

    Returns:
      [B, h, w, 3] float32 numpy array (h, w = out_hw when window is None).
    """
    rows, images = self.render_local(params, phi, out_hw, window)
    if len(rows) != phi.shape[0]:
      raise ValueError("phi has rows on other processes: use render_local")
    return images

  def render_local(self, params: PyTree, phi: jax.Array, out_hw: tuple[int, int],
                   window: tiles_lib.Window | None = None) -> tuple[np.ndarray, np.ndarray]:
    """As `render_image`, for the rows of phi this process holds.

    When phi is batch-sharded over a mesh, every device renders its own images
    and each process gets back only its rows; otherwise (e.g. one image) the
    tiles of each call are spread over the mesh (or the default device).

    Returns:
      (global row indices [b] of phi held here, images [b, h, w, 3] float32).
    """
    tiles_lib.check_window(out_hw, window)
    window = window or (0, 0, *out_hw)
    placement = _Placement.of(phi)
    rows = placement.local_rows(phi)
    out = np.zeros((len(rows), window[2], window[3], 3), np.float32)
    # Only the window's tiles, those of one padded shape together: few, full calls.
    tiles = sorted(tiles_lib.official_tiles(out_hw, self.tile, self.pad, window),
                   key=lambda t: t.in_hw)
    for chunk, result in self.iter_chunks(params, phi, out_hw, tiles, placement):
      for t, img in zip(chunk, placement.local_result(result, rows)):
        src_rows, src_cols, top, left = t.piece(window)
        piece = img[:, src_rows, src_cols]
        out[:, top:top + piece.shape[1], left:left + piece.shape[2]] = piece
    return rows, out

  def iter_chunks(self, params: PyTree, phi: jax.Array, out_hw: tuple[int, int],
                  tiles: Iterable[tiles_lib.Tile], placement: "_Placement | None" = None
                  ) -> Iterator[tuple[list[tiles_lib.Tile], jax.Array]]:
    """Renders `tiles` in batched calls; yields (tiles, result [n, B, h, w, 3]) in order.

    Consecutive tiles of one padded shape share a call of up to `tiles_per_call`
    tiles; a shorter run is padded by repetition to a power of two, so each
    shape class compiles for few call sizes. One call is dispatched ahead, so
    the host copies a result while the next one runs.
    """
    placement = placement or _Placement.of(phi)
    cell = placement.put(np.asarray([2 / out_hw[0], 2 / out_hw[1]], np.float32), P())
    pending = None
    for chunk in _runs(tiles, self.tiles_per_call):
      n = placement.round_tiles(min(self.tiles_per_call, 1 << (len(chunk) - 1).bit_length()))
      padded = chunk + [chunk[-1]] * (n - len(chunk))
      in_hw = chunk[0].in_hw
      rows = np.stack([coords.axis_centers(out_hw[0], t.in_origin[0], in_hw[0]) for t in padded])
      cols = np.stack([coords.axis_centers(out_hw[1], t.in_origin[1], in_hw[1]) for t in padded])
      result = self._tiles_fn(placement)(params, phi, placement.put(rows, placement.tile_spec),
                                         placement.put(cols, placement.tile_spec), cell)
      if pending is not None:
        yield pending
      pending = (chunk, result)
    if pending is not None:
      yield pending

  def tiles_program(self, phi: jax.Array | jax.ShapeDtypeStruct) -> Callable:
    """The jitted call `(params, phi, rows [n, h], cols [n, w], cell [2]) -> [n, B, h, w, 3]`
    that renders n tiles of shape (h, w) for phi's placement (for ahead-of-time compiles)."""
    return self._tiles_fn(_Placement.of(phi))

  def _tiles_fn(self, placement: "_Placement") -> Callable:
    key = (placement.mesh, placement.out_spec)
    if key not in self._tiles_fns:
      fn = functools.partial(_render_tiles, self.render_fn)
      if placement.mesh is not None and placement.batch_axes is None:
        # Each device renders its share of the call's tiles.
        tiles = placement.tile_spec
        fn = jax.shard_map(fn, mesh=placement.mesh, in_specs=(P(), P(), tiles, tiles, P()),
                           out_specs=tiles)
      out = None if placement.mesh is None else NamedSharding(placement.mesh, placement.out_spec)
      self._tiles_fns[key] = jax.jit(fn, out_shardings=out)
    return self._tiles_fns[key]


@dataclasses.dataclass(frozen=True)
class _Placement:
  """Where one render runs: phi's batch axis over the mesh, else tiles over the mesh."""
  mesh: Mesh | None
  batch_axes: Any      # mesh axes phi's batch is sharded over, or None
  tile_spec: P         # sharding of the per-call tile axis (coordinates)
  out_spec: P          # sharding of the result [n_tiles, B, h, w, 3]

  @classmethod
  def of(cls, phi: jax.Array) -> "_Placement":
    sharding = getattr(phi, "sharding", None)
    if not isinstance(sharding, NamedSharding):
      return cls(None, None, P(), P())
    spec = tuple(sharding.spec)
    if spec and spec[0] is not None:
      return cls(sharding.mesh, spec[0], P(), P(None, spec[0]))
    # Few images: spread each call's tiles over the devices; every process gets all tiles.
    axes = tuple(sharding.mesh.axis_names)
    return cls(sharding.mesh, None, P(axes), P())

  def round_tiles(self, n: int) -> int:
    """Tiles per call, a multiple of the device count when tiles are spread."""
    if self.mesh is None or self.batch_axes is not None:
      return n
    return -(-n // self.mesh.size) * self.mesh.size

  def put(self, x: np.ndarray, spec: P) -> jax.Array | np.ndarray:
    """A host array (the same on every process) as a global array on the mesh."""
    if self.mesh is None:
      return x
    return jax.make_array_from_callback(x.shape, NamedSharding(self.mesh, spec), lambda i: x[i])

  def local_rows(self, phi: jax.Array) -> np.ndarray:
    if self.batch_axes is None:
      return np.arange(phi.shape[0])
    starts = {s.index[0].start or 0: s.data.shape[0] for s in phi.addressable_shards}
    return np.concatenate([np.arange(a, a + n) for a, n in sorted(starts.items())])

  def local_result(self, result: jax.Array, rows: np.ndarray) -> np.ndarray:
    """This process's rows of a render result, host float32 [n, b, h, w, 3]."""
    if self.batch_axes is None:
      return np.asarray(jax.device_get(result), np.float32)
    parts = {s.index[1].start or 0: s.data for s in result.addressable_shards}
    return np.concatenate([np.asarray(parts[a], np.float32) for a in sorted(parts)], axis=1)


def local_rows(phi: jax.Array) -> np.ndarray:
  """Global row indices of phi whose images a render on this process returns, ascending:
  the rows it holds when phi is batch-sharded over a mesh, else every row."""
  return _Placement.of(phi).local_rows(phi)


def _runs(tiles: Iterable[tiles_lib.Tile], size: int) -> Iterator[list[tiles_lib.Tile]]:
  """Consecutive tiles of one padded shape, in groups of at most `size`."""
  run: list[tiles_lib.Tile] = []
  for t in tiles:
    if run and (t.in_hw != run[0].in_hw or len(run) == size):
      yield run
      run = []
    run.append(t)
  if run:
    yield run


def window_grid(out_hw: tuple[int, int], window: tiles_lib.Window, batch: int) -> tuple[jax.Array, jax.Array]:
  """Query grid (coord, cell) [batch, h, w, 2] of a window of a virtual out_hw image.

  For single-call rendering of a crop, as in training (global coordinates, cell 2/H).
  """
  top, left, h, w = window
  coord, cell = coords.window_coord_cell(out_hw, (top, left), (h, w))
  shape = (batch, h, w, 2)
  return jnp.broadcast_to(jnp.asarray(coord), shape), jnp.broadcast_to(jnp.asarray(cell), shape)

