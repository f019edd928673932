"""The tile service: DZI descriptors, tiles and saved views of a source's images.

A tile request is checked (`BadRequest` / `NotFound` before any work), then
answered from the disk cache, or joins an identical request in flight, or is
rendered through the batcher and stored. Tiles are PNG (lossless: a tile is
exactly the rendered window).
"""

import asyncio
import io
import math
import re
from typing import Mapping

import numpy as np
from PIL import Image

from infd_jax.view import batching, caches, dzi, sources

_TILE = re.compile(r"([^_]+)_([^_]+)\.png")
MAX_LEVEL = 40  # deeper than any accepted image (2^20 px a side has 21 levels)


def encode_png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=3)
  return buffer.getvalue()


class TileService:
  """Tiles of one source's images, cut as `tile_size` squares with `overlap` pixels.

  Args:
    source: what to show (`sources.Source`).
    disk: rendered tiles, keyed by the source's fingerprint.
    batcher: renders windows on the render thread.
    tile_size, overlap: the DZI tiling.
    max_export: largest side of a saved view, in pixels.
    max_scale: largest side of the image a saved view may be rendered from.
  """

  def __init__(self, source: sources.Source, disk: caches.DiskCache, batcher: batching.Batcher,
               *, tile_size: int = 256, overlap: int = 1, max_export: int = 8192,
               max_scale: int = 1 << 20):
    self.source, self.disk, self.batcher = source, disk, batcher
    self.tile_size, self.overlap = tile_size, overlap
    self.max_export, self.max_scale = max_export, max_scale
    self._prefix = (source.fingerprint()[:20], f"t{tile_size}o{overlap}")
    self._in_flight: dict[str, asyncio.Future] = {}

  def pyramid(self, ref: sources.ImageRef) -> dzi.Pyramid:
    return dzi.Pyramid(*ref.hw, tile_size=self.tile_size, overlap=self.overlap)

  def descriptor(self, name: str, size: str) -> str:
    return self.pyramid(self.source.image(name, size)).descriptor("png")

  async def tile(self, name: str, size: str, level: str, tile: str) -> bytes:
    """PNG bytes of `<name>/<size>_files/<level>/<tile>` (tile = `<col>_<row>.png`)."""
    ref = self.source.image(name, size)
    match = _TILE.fullmatch(tile)
    if not match:
      raise sources.NotFound(f"tile {tile[:40]!r} is not <column>_<row>.png")
    level_n = sources.parse_int(level, "level", 0, MAX_LEVEL)
    col = sources.parse_int(match[1], "column", 0, 1 << 30)
    row = sources.parse_int(match[2], "row", 0, 1 << 30)
    pyramid = self.pyramid(ref)
    try:
      level_hw = pyramid.level_hw(level_n)
      window = pyramid.tile_window(level_n, col, row)
    except ValueError as e:
      raise sources.NotFound(f"{ref.name} at {ref.size}: {e}") from None
    key = caches.key_path(*self._prefix, ref.name, ref.size, level_n, f"{col}_{row}.png")
    data = await asyncio.to_thread(self.disk.get, key)
    if data is not None:
      return data
    if key in self._in_flight:
      return await asyncio.shield(self._in_flight[key])
    future = asyncio.get_running_loop().create_future()
    self._in_flight[key] = future
    try:
      pixels = await self.batcher.render(batching.Job(ref, level_hw, window))
      data = await asyncio.to_thread(self._store, key, pixels)
      future.set_result(data)
      return data
    except BaseException as e:
      future.set_exception(e)
      future.exception()  # retrieved: nobody else may be waiting
      raise
    finally:
      del self._in_flight[key]

  def _store(self, key: str, pixels: np.ndarray) -> bytes:
    data = encode_png(pixels)
    self.disk.put(key, data)
    return data

  async def saved_view(self, query: Mapping[str, str]) -> bytes:
    """PNG of a viewer's region (x, y, w, h; the image is 1 wide) saved `width` px wide.

    The region is rendered at the saved scale (for a model: from the field, the
    image `width / w` pixels wide), in bands of rows so that memory stays bounded.
    """
    missing = [k for k in ("image", "size", "x", "y", "w", "h", "width") if k not in query]
    if missing:
      raise sources.BadRequest(f"saved view: missing {', '.join(missing)}")
    ref = self.source.image(query["image"], query["size"])
    region = tuple(_parse_float(query[k], k) for k in ("x", "y", "w", "h"))
    width = sources.parse_int(query["width"], "width", 1, self.max_export)
    try:
      level_hw, window = dzi.view_window(ref.hw, region, width)
    except ValueError as e:
      raise sources.BadRequest(f"saved view: {e}") from None
    if max(level_hw) > self.max_scale:
      raise sources.BadRequest(f"saved view: the region is shown {max(level_hw)} px wide, more "
                               f"than {self.max_scale}; save it narrower or zoom out")
    if window[2] > self.max_export:
      raise sources.BadRequest(f"saved view: {window[2]} px high is more than {self.max_export}")
    pixels = await self.batcher.run(lambda: self._render_bands(ref, level_hw, window))
    return await asyncio.to_thread(encode_png, pixels)

  def _render_bands(self, ref: sources.ImageRef, level_hw: tuple[int, int], window: dzi.Window
                    ) -> np.ndarray:
    top, left, h, w = window
    band = max(1, self.batcher.max_pixels // w)
    out = np.empty((h, w, 3), np.uint8)
    for r in range(0, h, band):
      rows = min(band, h - r)
      out[r:r + rows] = self.source.render(ref, level_hw, (top + r, left, rows, w))
    return out


def _parse_float(text: str, what: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise sources.BadRequest(f"{what}={text[:40]!r} is not a number") from None
  if not math.isfinite(value):
    raise sources.BadRequest(f"{what}={text[:40]!r} is not finite")
  return value
