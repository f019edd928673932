"""Images larger than memory: render tile by tile straight into a pyramidal BigTIFF.

The official tiles (tile x tile kept centres, `tiles.official_tiles`) line up
with the TIFF tiles, so each rendered tile is written as soon as it arrives, in
raster order; host memory holds one batch of tiles, whatever the image size.
Each overview level (half the size, down to one tile) is the neural field
rendered at that resolution, as INFD renders any scale, rather than a filtered
copy of level 0; viewers (QuPath, OpenSeadragon via vips, GDAL, napari) read the
levels as SubIFDs.
"""

import pathlib
import shutil
import tempfile
from typing import Any, Iterator

import jax
import numpy as np
import tifffile
from etils import epath

from infd_jax.rendering import pixels
from infd_jax.rendering import tiles as tiles_lib
from infd_jax.rendering import tiling

PyTree = Any


def iter_tiles(renderer: tiling.TiledRenderer, params: PyTree, phi: jax.Array,
               out_hw: tuple[int, int]) -> Iterator[np.ndarray]:
  """uint8 [tile, tile, 3] TIFF tiles of phi[0] rendered at out_hw, raster order, edges zero-padded."""
  t = renderer.tile
  tiles = tiles_lib.official_tiles(out_hw, t, renderer.pad)  # lazily: no list of every tile
  for chunk, result in renderer.iter_chunks(params, phi, out_hw, tiles):
    images = np.asarray(jax.device_get(result[:len(chunk), 0]), np.float32)
    for tile, img in zip(chunk, images):
      rows, cols, _, _ = tile.piece((*tile.out_origin, *tile.out_hw))
      out = np.zeros((t, t, 3), np.uint8)
      out[:tile.out_hw[0], :tile.out_hw[1]] = pixels.to_uint8(img[rows, cols])
      yield out


def num_tiles(out_hw: tuple[int, int], tile: int) -> int:
  """Tiles written for all levels of an out_hw image (for progress bars)."""
  return sum(-(-h // tile) * -(-w // tile) for h, w in pyramid(out_hw, tile))


def pyramid(out_hw: tuple[int, int], tile: int) -> list[tuple[int, int]]:
  """Level sizes: out_hw, then halved (rounded up) until one tile covers the image."""
  levels = [out_hw]
  while max(levels[-1]) > tile:
    h, w = levels[-1]
    levels.append((-(-h // 2), -(-w // 2)))
  return levels


def write_bigtiff(path: str | epath.PathLike, renderer: tiling.TiledRenderer, params: PyTree,
                  phi: jax.Array, out_hw: tuple[int, int], *, compression: str | None = "zlib",
                  owner: int = 0, progress=None) -> None:
  """Renders phi[0] (one image, any size) tile by tile into a tiled pyramidal BigTIFF.

  Every process must call this together (the renderer's calls span the mesh);
  only process `owner` writes the file.

  Args:
    path: the .tif to write.
    renderer: its `tile` is the TIFF tile size and must be a multiple of 16.
    params, phi: as for `TiledRenderer.render_image`; phi [1, Hf, Wf, C].
    out_hw: (H, W) of level 0.
    compression: a tifffile compression (zlib needs no extra package) or None.
    owner: the process that writes the file.
    progress: optional tqdm-like object, updated by the number of tiles written.
  """
  if renderer.tile % 16:
    raise ValueError(f"tile {renderer.tile}: TIFF tiles must be a multiple of 16 pixels")
  levels = pyramid(out_hw, renderer.tile)

  def tiles(hw):
    for tile in iter_tiles(renderer, params, phi, hw):
      if progress is not None:
        progress.update(1)
      yield tile

  options = dict(dtype=np.uint8, tile=(renderer.tile, renderer.tile), photometric="rgb",
                 compression=compression)
  if jax.process_index() != owner:
    for hw in levels:  # take part in the collective render calls, write nothing
      for _ in tiles(hw):
        pass
    return
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # TIFF writing seeks back; remote paths (gs://) get a local file copied once at the end.
  remote = "://" in str(path)
  local = pathlib.Path(tempfile.mkdtemp()) / path.name if remote else pathlib.Path(path)
  with tifffile.TiffWriter(local, bigtiff=True) as tif:
    tif.write(tiles(levels[0]), shape=(*levels[0], 3), subifds=len(levels) - 1, **options)
    for hw in levels[1:]:
      tif.write(tiles(hw), shape=(*hw, 3), subfiletype=1, **options)
  if remote:
    epath.Path(local).copy(path, overwrite=True)
    shutil.rmtree(local.parent)
