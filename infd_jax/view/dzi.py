"""Deep Zoom (DZI) geometry: pyramid levels, tile windows and the descriptor XML.

A DZI image of W x H pixels has levels 0..L with L = ceil(log2(max(W, H))); level l
is the image at ceil(W / 2^(L - l)) x ceil(H / 2^(L - l)) (level 0 is 1 x 1), cut
into `tile_size` squares (column c, row r), each grown by `overlap` pixels on every
side that has a neighbour. Viewers (OpenSeadragon, the Deep Zoom spec of Microsoft's
Silverlight) fetch `<name>_files/<level>/<c>_<r>.<format>`. No jax here: the server
checks requests with these functions before any model work.
"""

import dataclasses
from xml.sax import saxutils

Window = tuple[int, int, int, int]  # (top, left, height, width) in pixels of a level

_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"


@dataclasses.dataclass(frozen=True)
class Pyramid:
  """The DZI pyramid of an image of `height` x `width` pixels."""
  height: int
  width: int
  tile_size: int = 256
  overlap: int = 1

  @property
  def max_level(self) -> int:
    return (max(self.height, self.width) - 1).bit_length()  # ceil(log2(.)), exactly

  def level_hw(self, level: int) -> tuple[int, int]:
    """(height, width) of a level; ValueError outside 0..max_level."""
    if not 0 <= level <= self.max_level:
      raise ValueError(f"level {level} is not in 0..{self.max_level}")
    scale = 1 << (self.max_level - level)
    return -(-self.height // scale), -(-self.width // scale)

  def grid(self, level: int) -> tuple[int, int]:
    """(rows, columns) of tiles at a level."""
    h, w = self.level_hw(level)
    return -(-h // self.tile_size), -(-w // self.tile_size)

  def tile_window(self, level: int, col: int, row: int) -> Window:
    """The pixels of tile (col, row) of a level, overlap included; ValueError if absent."""
    rows, cols = self.grid(level)
    if not (0 <= col < cols and 0 <= row < rows):
      raise ValueError(f"tile {col}_{row} is not in the {cols} x {rows} tiles of level {level}")
    h, w = self.level_hw(level)
    top, bottom = self._span(row, h)
    left, right = self._span(col, w)
    return top, left, bottom - top, right - left

  def _span(self, index: int, length: int) -> tuple[int, int]:
    start = index * self.tile_size
    return max(0, start - self.overlap), min(length, start + self.tile_size + self.overlap)

  def descriptor(self, image_format: str = "png") -> str:
    """The .dzi XML document."""
    attrs = {"xmlns": _NAMESPACE, "Format": image_format, "Overlap": str(self.overlap),
             "TileSize": str(self.tile_size)}
    image = " ".join(f"{k}={saxutils.quoteattr(v)}" for k, v in attrs.items())
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image {image}>'
            f'<Size Width="{self.width}" Height="{self.height}"/></Image>\n')


def view_window(full_hw: tuple[int, int], region: tuple[float, float, float, float],
                out_width: int) -> tuple[tuple[int, int], Window]:
  """Where a viewer's region lands when saved `out_width` pixels wide.

  Args:
    full_hw: (H, W) of the image, for its aspect ratio.
    region: (x, y, w, h) in the viewer's coordinates (the image spans x in [0, 1] and
      y in [0, H / W]); must overlap the image.
    out_width: width of the saved picture in pixels.

  Returns:
    ((height, width) of the whole image at the saved scale, the window of it to render),
    the region clipped to the image.
  """
  x, y, w, h = region
  if not (w > 0 and h > 0):
    raise ValueError(f"region width and height must be positive, got {w} x {h}")
  aspect = full_hw[0] / full_hw[1]
  x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, 1.0), min(y + h, aspect)
  if x1 <= x0 or y1 <= y0:
    raise ValueError(f"region {region} does not overlap the image (0, 0, 1, {aspect:g})")
  scale = out_width / w  # output pixels per unit of viewer coordinates (= the image width)
  hw = max(1, round(aspect * scale)), max(1, round(scale))
  unit = hw[1]  # the same, rounded to whole pixels: the image is rendered this wide
  top, left = min(int(y0 * unit), hw[0] - 1), min(int(x0 * unit), hw[1] - 1)
  bottom = min(max(round(y1 * unit), top + 1), hw[0])
  right = min(max(round(x1 * unit), left + 1), hw[1])
  return hw, (top, left, bottom - top, right - left)
