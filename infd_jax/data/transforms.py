"""Per-example transforms (REFERENCE.md 5.4, `wrapper_cae`), numpy + PIL only.

All resizing is PIL LANCZOS on uint8 RGB images. Stage 2 images are float32,
HWC, in [-1, 1] (2 * uint8 / 255 - 1). Stage 1 examples stay uint8 and carry
their crop (r, ii, jj): the official images are uint8 before ToTensor /
Normalize too, so `training.on_device.ae_batch` rebuilds the same float images and
grids inside the jitted step, and a quarter of the bytes cross to the device.
Randomness comes only from the numpy Generator
that grain passes to `random_map`.

Fast patch path: the ground-truth patch is the P x P window at (ii, jj) of the
S x S image LANCZOS-resized to r x r. PIL resamples only that window when given
`box` = the window's footprint in source pixels, (jj, ii, jj + P, ii + P) * S / r.
Output pixel centres, filter support and border clamping are those of the full
resize (PIL clamps taps to the image, not to the box), so the patch matches
resize-then-crop (`resize_then_crop`, kept as the reference) within 1/255 at
a fraction of the cost.
"""

import dataclasses
from typing import Any, Callable

import numpy as np
from PIL import Image

from infd_jax.data import image_io

LANCZOS = Image.Resampling.LANCZOS


def to_float(img: Image.Image) -> np.ndarray:
  """uint8 RGB PIL image -> float32 [H, W, 3] in [-1, 1]."""
  return np.asarray(img, dtype=np.float32) * (2.0 / 255.0) - 1.0


def sample_resolution(rng: np.random.Generator, size: int, *, patch: int,
                      gt_res_min: int, gt_res_max: int, p_whole: float,
                      p_max: float) -> int:
  """Ground-truth resolution r for an image of side `size` (REFERENCE.md 5.4).

  p_whole -> r = patch; else p_max -> r = min(size, gt_res_max); else r is a
  uniform integer in [gt_res_min, min(size, gt_res_max)], both ends inclusive.
  """
  hi = min(size, gt_res_max)
  if hi < gt_res_min:
    raise ValueError(f"image side {size} is below gt_res_min={gt_res_min}")
  if rng.random() < p_whole:
    return patch
  if rng.random() < p_max:
    return hi
  return int(rng.integers(gt_res_min, hi, endpoint=True))


def patch_coord(r: int, ii: int, jj: int, patch: int) -> np.ndarray:
  """Global pixel-centre coords of a crop: [P, P, 2] (row, col) in [-1, 1].

  coord[a, b] = (2 * (ii + a + 0.5) / r - 1, 2 * (jj + b + 0.5) / r - 1).
  """
  a = (2.0 * (ii + np.arange(patch) + 0.5) / r - 1.0).astype(np.float32)
  b = (2.0 * (jj + np.arange(patch) + 0.5) / r - 1.0).astype(np.float32)
  rows, cols = np.meshgrid(a, b, indexing="ij")
  return np.stack([rows, cols], axis=-1)


def patch_cell(r: int, patch: int) -> np.ndarray:
  """Cell size of every crop pixel: [P, P, 2] filled with 2 / r."""
  return np.full((patch, patch, 2), 2.0 / r, dtype=np.float32)


def resize_then_crop(img: Image.Image, r: int, ii: int, jj: int,
                     patch: int) -> Image.Image:
  """Reference path: resize the whole image to r x r, then crop."""
  full = img.resize((r, r), LANCZOS)
  return full.crop((jj, ii, jj + patch, ii + patch))


def fast_patch(img: Image.Image, r: int, ii: int, jj: int, patch: int) -> Image.Image:
  """Same patch as `resize_then_crop`, resampling only the needed window."""
  s = img.size[0]
  if r == s:
    return img.crop((jj, ii, jj + patch, ii + patch))
  scale = s / r
  box = (jj * scale, ii * scale, (jj + patch) * scale, (ii + patch) * scale)
  return img.resize((patch, patch), LANCZOS, box=box)


def random_square(img: Image.Image, rng: np.random.Generator, min_side: int) -> Image.Image:
  """A window of the square image: side uniform in [min_side, S], origin uniform."""
  s = img.size[0]
  side = int(rng.integers(min(min_side, s), s, endpoint=True))
  top, left = (int(v) for v in rng.integers(0, s - side, size=2, endpoint=True))
  return img.crop((left, top, left + side, top + side))


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Decodes a record and applies the optional square resize.

  Attributes:
    inp_res: side of the encoder input `inp`.
    resize: if set, LANCZOS-resize the stored square to resize x resize first
      (the official image_folder `resize`: 1024 for stage 1, 256 for stage 2).
  """
  inp_res: int = 256
  resize: int | None = None

  def load(self, record: dict[str, Any]) -> Image.Image:
    img = image_io.decode_rgb(record["image"])
    if img.size[0] != img.size[1]:
      raise ValueError(f"record {record.get('name')!r} is not square: {img.size}")
    if self.resize is not None:
      img = img.resize((self.resize, self.resize), LANCZOS)
    return img

  def inp(self, img: Image.Image) -> np.ndarray:
    """uint8 [inp_res, inp_res, 3]; always resampled, even at inp_res (PIL then copies)."""
    return np.asarray(img.resize((self.inp_res, self.inp_res), LANCZOS))


@dataclasses.dataclass(frozen=True)
class DmTransform(ImageTransform):
  """Stage 2: {"inp": [inp_res, inp_res, 3]}."""

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict:
    del rng
    return {"inp": to_float(self.inp(self.load(record)))}


@dataclasses.dataclass(frozen=True)
class CaptionTransform:
  """Text to image: {"image": float32 [inp_res, inp_res, 3] in [-1, 1], "tokens": int32 [L]}.

  Attributes:
    image: the stage-2 image transform.
    tokenize: [caption] -> token ids [1, L] (`infd_jax.clip.tokenizer.Tokenizer`).
    feature: the record feature holding the caption (text or UTF-8 bytes).
  """
  image: DmTransform
  tokenize: Callable[[list[str]], np.ndarray]
  feature: str = "caption"

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict:
    caption = record[self.feature]
    caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    return {"image": self.image(record, rng)["inp"],
            "tokens": np.asarray(self.tokenize([caption])[0], np.int32)}


@dataclasses.dataclass(frozen=True)
class AeTransform(ImageTransform):
  """Stage 1: inp, the gt patch and its crop (REFERENCE.md 5.4).

  Returns {"inp": uint8 [inp_res, inp_res, 3], "gt": uint8 [P, P, 3], "crop":
  int32 [3] = (r, ii, jj)}: the window at row ii, column jj of the image resized
  to r x r. Its coord and cell are `patch_coord(r, ii, jj, P)` and
  `patch_cell(r, P)`, built on the device by `training.on_device.ae_batch`.

  `inp_crop` > 0 (demo-only; 0 is the official whole image) first takes a random
  square window of side uniform in [max(inp_crop * S, gt_res_min), S] of the S x S
  image, and everything above applies to that window: few photos then still give
  the encoder varied inputs.
  """
  patch: int = 256
  gt_res_min: int = 256
  gt_res_max: int = 1024
  p_whole: float = 0.0
  p_max: float = 0.0
  fast: bool = True
  inp_crop: float = 0.0

  def __post_init__(self):
    if self.gt_res_min < self.patch:
      raise ValueError(f"gt_res_min={self.gt_res_min} < patch={self.patch}")

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict:
    img = self.load(record)
    if self.inp_crop > 0:
      img = random_square(img, rng, max(round(self.inp_crop * img.size[0]), self.gt_res_min))
    r = sample_resolution(rng, img.size[0], patch=self.patch,
                          gt_res_min=self.gt_res_min, gt_res_max=self.gt_res_max,
                          p_whole=self.p_whole, p_max=self.p_max)
    ii, jj = (int(v) for v in rng.integers(0, r - self.patch, size=2, endpoint=True))
    crop = fast_patch if self.fast else resize_then_crop
    return {"inp": self.inp(img), "gt": np.asarray(crop(img, r, ii, jj, self.patch)),
            "crop": np.asarray([r, ii, jj], np.int32)}


@dataclasses.dataclass(frozen=True)
class PoolMix:
  """6K-Mix sampler (REFERENCE.md 5.1 `random_lr_hr`): ignores the element index.

  With probability p_lr draws a uniform LR-pool record, otherwise a uniform
  HR-pool record, then applies `transform` with the same generator.
  """
  transform: Any
  lr: Any
  hr: Any
  p_lr: float = 0.5

  def __call__(self, index: int, rng: np.random.Generator) -> dict:
    del index
    pool = self.lr if rng.random() < self.p_lr else self.hr
    return self.transform(pool[int(rng.integers(len(pool)))], rng)
