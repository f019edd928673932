"""What the viewer shows: images named in URLs, and the pixels of any window of them.

A source resolves a URL's image name and size to an `ImageRef` (or refuses the
request: `BadRequest` -> 400, `NotFound` -> 404) and renders windows of the
image at any scale. `model_source.ModelSource` renders samples of a trained model
from their neural field; `file_source.FileSource` reads existing outputs (PNG
folders, BigTIFF pyramids).
"""

import dataclasses
from typing import Any, Hashable, Protocol

import numpy as np

from infd_jax.view.dzi import Window

MAX_SIZE = 1 << 20   # largest virtual image side served
MAX_SEED = (1 << 32) - 1
MAX_INDEX = (1 << 31) - 1


class BadRequest(ValueError):
  """A malformed request (answered 400)."""


class NotFound(LookupError):
  """A well-formed request for something that does not exist (answered 404)."""


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """One image a source can render.

  Attributes:
    name: its name in URLs.
    size: its size field in URLs (the virtual size of a sample; "full" for files).
    hw: (height, width) of the image at full resolution.
    key: what identifies it inside its source (hashable, e.g. (seed, index)).
  """
  name: str
  size: str
  hw: tuple[int, int]
  key: Hashable


class Source(Protocol):
  """The interface the server uses; `render` runs on one thread at a time."""

  kind: str

  def image(self, name: str, size: str) -> ImageRef:
    """The image a URL names; BadRequest or NotFound if none."""

  def render(self, ref: ImageRef, level_hw: tuple[int, int], window: Window) -> np.ndarray:
    """uint8 [h, w, 3]: `window` of the image shown at level_hw (any size)."""

  def fingerprint(self) -> str:
    """Changes whenever rendered pixels could (keys the disk cache)."""

  def describe(self) -> dict[str, Any]:
    """JSON-ready facts for the page (kind, image names, limits)."""


def parse_int(text: str, what: str, low: int, high: int) -> int:
  """A decimal integer in [low, high] from a URL part; BadRequest naming `what` otherwise."""
  if not (text.isascii() and text.isdigit() and len(text) <= len(str(high))):
    raise BadRequest(f"{what} {text[:40]!r} is not an integer in {low}..{high}")
  value = int(text)
  if not low <= value <= high:
    raise BadRequest(f"{what} {value} is not in {low}..{high}")
  return value
