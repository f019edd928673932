"""The official tile geometry (REFERENCE.md 7), the one copy that rendering, streaming and
guidance use.

The official `render_output_patchwise` walks the output in tile x tile steps
(256), renders each tile with up to `pad` (8) pixels of context on each side
that exists, and keeps the centre. A window (top, left, height, width) of a
virtual image needs only the tiles whose kept centre meets it; they are
enumerated directly, so a window costs its own tiles whatever the image size.
Pure Python: no arrays, no jax.
"""

import dataclasses
from typing import Iterator

Window = tuple[int, int, int, int]  # (top, left, height, width) in output pixels


@dataclasses.dataclass(frozen=True)
class Span:
  """One tile along one axis: the kept pixels and the padded input around them."""
  out_start: int  # first kept pixel
  out_len: int    # kept pixels (tile, or less at the end of the axis)
  in_start: int   # first pixel of the padded input
  in_len: int     # padded input length (the renderer call's grid)


def axis_spans(size: int, tile: int, pad: int, start: int = 0, length: int | None = None
               ) -> list[Span]:
  """The tiles of a `size`-pixel axis whose kept pixels meet [start, start + length), in order."""
  length = size - start if length is None else length
  spans = []
  for x0 in range(start // tile * tile, start + length, tile):
    xl = min(tile, size - x0)
    before, after = min(pad, x0), min(pad, size - (x0 + xl))
    spans.append(Span(out_start=x0, out_len=xl, in_start=x0 - before,
                      in_len=before + xl + after))
  return spans


@dataclasses.dataclass(frozen=True)
class Tile:
  """One official tile: the padded input window and the kept centre, in output pixels."""
  in_origin: tuple[int, int]   # top-left of the padded input tile
  in_hw: tuple[int, int]       # padded input size (the renderer call's grid)
  out_origin: tuple[int, int]  # top-left of the kept centre (x0, y0)
  out_hw: tuple[int, int]      # kept centre size (xl, yl)

  def piece(self, window: Window) -> tuple[slice, slice, int, int] | None:
    """Where the kept centre meets `window`: (rows, cols) slices of the rendered padded
    tile, and the (top, left) of that piece inside the window; None if they do not meet."""
    (tr, tc), (th, tw) = self.out_origin, self.out_hw
    top, left, h, w = window
    r0, r1 = max(tr, top), min(tr + th, top + h)
    c0, c1 = max(tc, left), min(tc + tw, left + w)
    if r0 >= r1 or c0 >= c1:
      return None
    ir, ic = r0 - self.in_origin[0], c0 - self.in_origin[1]
    return slice(ir, ir + r1 - r0), slice(ic, ic + c1 - c0), r0 - top, c0 - left


def official_tiles(out_hw: tuple[int, int], tile: int = 256, pad: int = 8,
                   window: Window | None = None) -> Iterator[Tile]:
  """The tiles of an out_hw image whose kept centre meets `window` (default: all), in the
  official order (rows outer, columns inner), generated lazily."""
  top, left, h, w = window or (0, 0, *out_hw)
  cols = axis_spans(out_hw[1], tile, pad, left, w)
  for r in axis_spans(out_hw[0], tile, pad, top, h):
    for c in cols:
      yield Tile(in_origin=(r.in_start, c.in_start), in_hw=(r.in_len, c.in_len),
                 out_origin=(r.out_start, c.out_start), out_hw=(r.out_len, c.out_len))


def check_window(out_hw: tuple[int, int], window: Window | None, name: str = "window") -> None:
  """Raises ValueError unless window=(top, left, h, w) is a non-empty part of the image."""
  if window is None:
    return
  top, left, h, w = window
  if not (0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= out_hw[0]
          and left + w <= out_hw[1]):
    raise ValueError(f"{name} {tuple(window)} (top, left, height, width) is not inside the "
                     f"{out_hw[0]}x{out_hw[1]} image")
