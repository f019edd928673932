"""Existing outputs as deep-zoom images, without a model: PNG folders and BigTIFF pyramids.

A BigTIFF written by the sampler (`rendering/stream.py`) holds one level per
halving (SubIFDs), each rendered from the field at that scale; they are exactly
the DZI levels, and only the TIFF tiles under a window are read. Below its
smallest level, and for PNGs (which can only be decoded whole), a level is the
image reduced by a power of two (box filter, `PIL.Image.reduce`), whose sizes are
the DZI level sizes. Other sizes (saved views) resample the nearest larger level.
"""

import hashlib
import math
import pathlib
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from infd_jax import checks
from infd_jax.view import caches, sources
from infd_jax.view.dzi import Window

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
MAX_READ_PIXELS = 1 << 26  # largest region read to resample one window


def discover(path: pathlib.Path) -> dict[str, pathlib.Path]:
  """{file name: path} of the images in a folder (not its subfolders), or of one file."""
  suffixes = IMAGE_SUFFIXES + TIFF_SUFFIXES
  if path.is_file():
    files = [path] if path.suffix.lower() in suffixes else []
  else:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
  if not files:
    raise checks.UserError(f"{path}: no PNG, JPEG, WebP or TIFF image there")
  return {p.name: p for p in files}


class FileSource:
  """The images of a folder (or one file), each under its file name, size `full`.

  Args:
    path: a folder of PNG/JPEG/WebP/TIFF images, or one such file.
    decoded_bytes: bound on the decoded PNG levels kept in memory; a PNG larger
      than this is not served.
  """

  kind = "files"

  def __init__(self, path: str | pathlib.Path, *, decoded_bytes: int = 1 << 30):
    self.path = pathlib.Path(path)
    self._files = discover(self.path)
    self._pixels = caches.LRU(decoded_bytes, cost=lambda a: a.nbytes)
    self._levels: dict[str, list[tuple[int, int]]] = {}

  def image(self, name: str, size: str) -> sources.ImageRef:
    if name not in self._files:
      raise sources.NotFound(f"no image {name[:80]!r} in {self.path}")
    if size != "full":
      raise sources.NotFound(f"image {name!r} has one size, 'full', not {size[:40]!r}")
    return sources.ImageRef(name=name, size="full", hw=self._level_sizes(name)[0], key=name)

  def _level_sizes(self, name: str) -> list[tuple[int, int]]:
    """(h, w) of the levels stored (TIFF) or made by reduction (PNG), largest first."""
    if name not in self._levels:
      path = self._files[name]
      if path.suffix.lower() in TIFF_SUFFIXES:
        with tifffile.TiffFile(path) as tif:
          sizes = [tuple(level.shape[:2]) for level in tif.series[0].levels]
      else:
        with Image.open(path) as image:
          w, h = image.size
        if h * w * 3 > self._pixels.capacity:
          raise sources.NotFound(f"{name}: {w}x{h} is too large to decode whole; write it as a "
                                 "BigTIFF pyramid (sample.stream_above) to view it")
        sizes = [(h, w)]
      self._levels[name] = sizes
    return self._levels[name]

  def render(self, ref: sources.ImageRef, level_hw: tuple[int, int], window: Window
             ) -> np.ndarray:
    stored = self._level_sizes(ref.key)
    if stored[-1][0] > level_hw[0] and stored[-1][1] > level_hw[1]:
      stored = stored + _reductions(stored[-1], level_hw)  # below the smallest stored level
    larger = [i for i, hw in enumerate(stored) if hw[0] >= level_hw[0] and hw[1] >= level_hw[1]]
    index = larger[-1] if larger else 0
    src_hw = stored[index]
    if src_hw == tuple(level_hw):
      return self._read(ref.key, index, stored, window)
    sy, sx = src_hw[0] / level_hw[0], src_hw[1] / level_hw[1]
    top, left, h, w = window
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    r0, c0 = int(box[1]), int(box[0])
    r1, c1 = min(src_hw[0], math.ceil(box[3])), min(src_hw[1], math.ceil(box[2]))
    if (r1 - r0) * (c1 - c0) > MAX_READ_PIXELS:
      raise sources.NotFound(f"{ref.key}: no stored level near {level_hw[1]}x{level_hw[0]}")
    region = self._read(ref.key, index, stored, (r0, c0, r1 - r0, c1 - c0))
    resample = Image.Resampling.BOX if sx >= 1 and sy >= 1 else Image.Resampling.BICUBIC
    out = Image.fromarray(region).resize(
        (w, h), resample, box=(box[0] - c0, box[1] - r0, box[2] - c0, box[3] - r0))
    return np.asarray(out)

  def _read(self, name: str, index: int, stored: list[tuple[int, int]], window: Window
            ) -> np.ndarray:
    path = self._files[name]
    tiff_levels = len(self._level_sizes(name)) if path.suffix.lower() in TIFF_SUFFIXES else 0
    if index < tiff_levels:
      with tifffile.TiffFile(path) as tif:
        return _tiff_region(tif, tif.series[0].levels[index].keyframe, window)
    top, left, h, w = window
    return self._reduced(name, stored, index, tiff_levels)[top:top + h, left:left + w]

  def _reduced(self, name: str, stored: list[tuple[int, int]], index: int, tiff_levels: int
               ) -> np.ndarray:
    """A whole level made by reducing the smallest stored one (or the PNG) 2^k times."""
    def make():
      base = max(tiff_levels - 1, 0)
      if tiff_levels:
        with tifffile.TiffFile(self._files[name]) as tif:
          level = tif.series[0].levels[base].keyframe
          pixels = _tiff_region(tif, level, (0, 0, *stored[base]))
      else:
        with Image.open(self._files[name]) as image:
          pixels = np.asarray(image.convert("RGB"))
      factor = 1 << (index - base)
      return pixels if factor == 1 else np.asarray(Image.fromarray(pixels).reduce(factor))
    return self._pixels.get_or_make((name, index), make)

  def fingerprint(self) -> str:
    digest = hashlib.sha256(str(self.path.resolve()).encode())
    for name, path in self._files.items():
      stat = path.stat()
      digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()

  def describe(self) -> dict[str, Any]:
    return {"kind": self.kind, "path": str(self.path), "images": list(self._files)}


def _reductions(smallest: tuple[int, int], target: tuple[int, int]) -> list[tuple[int, int]]:
  """Sizes of `smallest` halved (rounded up) until no larger than target."""
  out, (h, w) = [], smallest
  while h > target[0] and w > target[1]:
    h, w = -(-h // 2), -(-w // 2)
    out.append((h, w))
  return out


def _tiff_region(tif: tifffile.TiffFile, page: tifffile.TiffPage, window: Window) -> np.ndarray:
  """uint8 [h, w, 3] of a window of one TIFF page, reading only the tiles under it."""
  top, left, h, w = window
  if not page.is_tiled:
    return np.asarray(page.asarray())[top:top + h, left:left + w, :3]
  th, tw = page.tilelength, page.tilewidth
  across = -(-page.imagewidth // tw)
  out = np.zeros((h, w, 3), np.uint8)
  for row in range(top // th, (top + h - 1) // th + 1):
    for col in range(left // tw, (left + w - 1) // tw + 1):
      index = row * across + col
      tif.filehandle.seek(page.dataoffsets[index])
      tile = page.decode(tif.filehandle.read(page.databytecounts[index]), index)[0][0]
      r0, r1 = max(top, row * th), min(top + h, (row + 1) * th, page.imagelength)
      c0, c1 = max(left, col * tw), min(left + w, (col + 1) * tw, page.imagewidth)
      out[r0 - top:r1 - top, c0 - left:c1 - left] = (
          tile[r0 - row * th:r1 - row * th, c0 - col * tw:c1 - col * tw, :3])
  return out
