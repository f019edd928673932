"""Fidelity of any-resolution renders against exact ground truth, with classical baselines.

Numpy (host) helpers for `bench.openmoji`: images are float32 [n, H, W, 3] in
[-1, 1] or uint8 [n, H, W, 3]; the metrics take either (renders are scored as
the uint8 images a user gets, `infd_jax.rendering.pixels.to_uint8`).

- `upsample`: the classical baselines (PIL bicubic / Lanczos of the same uint8 input).
- `psnr`: PSNR on the [0, 1] scale, per image, in float64.
- `crop_boxes` / `crops`: fixed square windows, the same for every method, so a
  perceptual metric of large renders costs one window per image.
- `nearest`: for each query image, the closest reference image (mean squared
  error over pixels), to tell generated samples from copies of training data.
"""

from typing import Callable

import numpy as np
from PIL import Image

UPSAMPLERS = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def to_unit(images: np.ndarray) -> np.ndarray:
  """uint8 or [-1, 1] images -> float64 in [0, 1]."""
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return x.astype(np.float64) / 255.0
  return (x.astype(np.float64) + 1.0) / 2.0


def upsample(images: np.ndarray, size: int, method: str) -> np.ndarray:
  """uint8 [n, h, w, 3] -> uint8 [n, size, size, 3] by PIL `method` (bicubic, lanczos)."""
  if method not in UPSAMPLERS:
    raise ValueError(f"upsample method {method!r} not in {sorted(UPSAMPLERS)}")
  if images.dtype != np.uint8:
    raise TypeError(f"upsample takes uint8 images, got {images.dtype}")
  return np.stack([np.asarray(Image.fromarray(x).resize((size, size), UPSAMPLERS[method]))
                   for x in images])


def psnr(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
  """[n] PSNR in dB of pred against gt on the [0, 1] scale (float64; inf where equal)."""
  mse = np.mean(np.square(to_unit(pred) - to_unit(gt)), axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return -10.0 * np.log10(mse)


def crop_boxes(n: int, size: int, crop: int, seed: int) -> np.ndarray:
  """[n, 2] int (top, left) of one crop x crop window per image of side `size`.

  Uniform over the window positions, from a Generator seeded by (seed, size), so
  every method compared at this size is cropped at the same places; the whole
  image (0, 0) when crop >= size.
  """
  if crop >= size:
    return np.zeros((n, 2), np.int64)
  rng = np.random.default_rng([seed, size])
  return rng.integers(0, size - crop + 1, size=(n, 2))


def crops(images: np.ndarray, boxes: np.ndarray, crop: int) -> np.ndarray:
  """[n, crop', crop', 3] windows of [n, S, S, 3] at `boxes` (crop' = min(crop, S))."""
  side = min(crop, images.shape[1])
  return np.stack([x[t:t + side, l:l + side] for x, (t, l) in zip(images, boxes)])


def nearest(queries: np.ndarray, references: np.ndarray, chunk: int = 256
            ) -> tuple[np.ndarray, np.ndarray]:
  """(index [q], MSE [q]) of each query's nearest reference image, in [0, 1] units.

  Squared distances are ||q||^2 - 2 q.r + ||r||^2 in float64, by chunks of
  references so memory stays at q x chunk.
  """
  q = to_unit(queries).reshape(len(queries), -1)
  q_norm = np.sum(q * q, axis=1)
  best = np.full(len(q), np.inf)
  index = np.zeros(len(q), np.int64)
  for start in range(0, len(references), chunk):
    r = to_unit(references[start:start + chunk]).reshape(-1, q.shape[1])
    d = q_norm[:, None] - 2.0 * q @ r.T + np.sum(r * r, axis=1)[None]
    j = np.argmin(d, axis=1)
    better = d[np.arange(len(q)), j] < best
    best[better] = d[np.arange(len(q)), j][better]
    index[better] = start + j[better]
  return index, np.maximum(best, 0.0) / q.shape[1]


def batched(fn: Callable[[np.ndarray, np.ndarray], np.ndarray], a: np.ndarray, b: np.ndarray,
            batch: int) -> np.ndarray:
  """fn over aligned batches of (a, b), concatenated: bounded memory for a jitted metric.

  The last batch is padded by repeating its last row (one shape, one compilation).
  """
  out = []
  for i in range(0, len(a), batch):
    x, y = a[i:i + batch], b[i:i + batch]
    pad = batch - len(x)
    if pad:
      x, y = (np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for v in (x, y))
    out.append(np.asarray(fn(x, y))[:batch - pad])
  return np.concatenate(out)
