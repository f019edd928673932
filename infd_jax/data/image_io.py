"""Image decoding and validation with PIL (no TensorFlow, no jax).

`prepare_image` turns one input file into the square RGB image that is stored
in a dataset, or raises `SkipImage` with a reason. Its outcomes, in order:
- undecodable or truncated file: skipped ("cannot decode: ...");
- more than `max_pixels` pixels: skipped without decoding (memory guard);
  PIL's own decompression-bomb limit is lifted while decoding, because the
  files are the user's own data and `max_pixels` replaces it;
- mode conversion to 8-bit RGB:
  - grayscale (L, 1), palette (P), CMYK, YCbCr: PIL's conversion;
  - alpha (RGBA, LA, PA, palette with transparency): composited over white
    (the official code drops alpha, which exposes whatever colours sit under
    transparent pixels);
  - 16-bit (I;16*, and I as written by 16-bit grayscale files): scaled with
    round(v * 255 / 65535), never clipped; 16-bit RGB files are reduced to
    8 bits by PIL itself;
  - float (F): values in [0, 1] are scaled by 255; anything else is skipped;
- centre square crop, side l = min(w, h), left (w - l) // 2, top (h - l) // 2
  (as the official `image_folder`; done here at prepare time, so every stored
  image is square);
- l < `min_side`: skipped ("too small");
- l > `max_side`: LANCZOS downscale of the square to `max_side` (at most
  9459, so that reading back stays under PIL's default bomb limit).
EXIF orientation is not applied (the official code does not apply it either).
"""

import contextlib
import dataclasses
import io
import os
import posixpath
from typing import BinaryIO, Iterator

from etils import epath
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_READ_MAX_SIDE = 9459


class SkipImage(Exception):
  """Raised when a file cannot become a dataset image; the message says why."""


@dataclasses.dataclass(frozen=True)
class ImageLimits:
  """Size limits applied at prepare time.

  Attributes:
    min_side: square side (after the centre crop) below which a file is skipped.
    max_side: square side above which the square is LANCZOS-downscaled.
    max_pixels: w * h above which a file is skipped without decoding.
  """
  min_side: int = 256
  max_side: int = 4096
  max_pixels: int = 1 << 28

  def __post_init__(self):
    # Stored images are decoded again in the grain map with PIL's default
    # decompression-bomb limit in force (89,478,485 pixels, i.e. side 9459).
    if self.max_side > _READ_MAX_SIDE:
      raise ValueError(f"max_side={self.max_side} > {_READ_MAX_SIDE}")
    if self.min_side > self.max_side:
      raise ValueError(f"min_side={self.min_side} > max_side={self.max_side}")


@dataclasses.dataclass(frozen=True)
class PreparedImage:
  """An image ready to be stored: encoded bytes of a square RGB image."""
  data: bytes
  size: int
  notes: tuple[str, ...]


def is_image_file(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str | os.PathLike) -> list[str]:
  """Image files under `root` (a local or remote folder, recursive), as sorted relative paths."""
  found, top = [], None
  for dirpath, _, filenames in epath.Path(root).walk():
    # Remote backends name the folders they walk without their protocol, so the
    # relative paths are taken against the first (top) folder as they name it.
    top = top if top is not None else str(dirpath)
    for name in filenames:
      if is_image_file(name):
        found.append(posixpath.relpath(posixpath.join(str(dirpath), name), top))
  return sorted(found)


@contextlib.contextmanager
def _no_pil_bomb_limit() -> Iterator[None]:
  old = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = None
  try:
    yield
  finally:
    Image.MAX_IMAGE_PIXELS = old


def to_rgb(img: Image.Image) -> tuple[Image.Image, str | None]:
  """Converts any PIL mode to 8-bit RGB; returns the image and a note."""
  mode = img.mode
  if mode == "RGB":
    return img, None
  if mode in _SIXTEEN_BIT_MODES:
    arr = np.asarray(img).astype(np.float64)
    arr = np.clip(np.round(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB"), f"16-bit {mode} scaled to 8-bit"
  if mode == "F":
    arr = np.asarray(img)
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
      raise SkipImage("float image with values outside [0, 1]")
    arr = np.round(arr * 255.0).astype(np.uint8)
    return Image.fromarray(arr, "L").convert("RGB"), "float image scaled by 255"
  if mode == "P" and "transparency" in img.info:
    img, mode = img.convert("RGBA"), "P+transparency"
  if img.mode in _ALPHA_MODES:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    out = Image.alpha_composite(white, rgba).convert("RGB")
    return out, f"{mode} alpha composited over white"
  try:
    return img.convert("RGB"), f"{mode} converted to RGB"
  except (ValueError, OSError) as e:
    raise SkipImage(f"cannot convert mode {mode} to RGB: {e}") from e


def center_square(img: Image.Image) -> Image.Image:
  """Centre square crop: side min(w, h), left (w-l)//2, top (h-l)//2."""
  w, h = img.size
  side = min(w, h)
  if w == h:
    return img
  left, top = (w - side) // 2, (h - side) // 2
  return img.crop((left, top, left + side, top + side))


def encode_png(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def prepare_image(src: str | bytes | BinaryIO,
                  limits: ImageLimits = ImageLimits()) -> PreparedImage:
  """Validates one file and returns the square RGB image to store.

  Original bytes are kept when the file is an 8-bit RGB PNG or JPEG that is
  already square and within limits; otherwise the result is re-encoded as PNG.

  Args:
    src: a path, raw file bytes, or a binary file object.
    limits: size limits.

  Returns:
    The encoded image, its side and notes on what was changed.

  Raises:
    SkipImage: when the file cannot be used (the message gives the reason).
  """
  raw = src if isinstance(src, bytes) else None
  if isinstance(src, str):
    with epath.Path(src).open("rb") as f:
      raw = f.read()
  elif raw is None:
    raw = src.read()
  with _no_pil_bomb_limit():
    return _prepare_decoded(raw, limits)


def _prepare_decoded(raw: bytes, limits: ImageLimits) -> PreparedImage:
  try:
    img = Image.open(io.BytesIO(raw))
    w, h = img.size
    if w * h > limits.max_pixels:
      raise SkipImage(f"{w}x{h} has more than max_pixels={limits.max_pixels} pixels")
    img.load()
  except SkipImage:
    raise
  except Exception as e:  # PIL raises many types for broken files.
    raise SkipImage(f"cannot decode: {type(e).__name__}: {e}") from e
  fmt = img.format
  img, note = to_rgb(img)
  notes = [note] if note else []
  side = min(w, h)
  if side < limits.min_side:
    raise SkipImage(f"too small: square side {side} < min_side={limits.min_side}")
  if w != h:
    img = center_square(img)
    notes.append(f"centre-cropped {w}x{h} to {side}x{side}")
  if side > limits.max_side:
    img = img.resize((limits.max_side, limits.max_side), Image.Resampling.LANCZOS)
    notes.append(f"downscaled {side} to max_side={limits.max_side}")
    side = limits.max_side
  if not notes and fmt in ("PNG", "JPEG"):
    return PreparedImage(raw, side, ())
  return PreparedImage(encode_png(img), side, tuple(notes))


def resize_square(data: bytes, size: int) -> bytes:
  """LANCZOS-resizes an encoded square RGB image to size x size, as PNG."""
  img = decode_rgb(data)
  return encode_png(img.resize((size, size), Image.Resampling.LANCZOS))


def decode_rgb(data: bytes) -> Image.Image:
  """Decodes stored image bytes (already validated RGB) to a loaded PIL image."""
  img = Image.open(io.BytesIO(data))
  img.load()
  return img if img.mode == "RGB" else img.convert("RGB")
