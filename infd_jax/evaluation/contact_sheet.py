"""The demo's closing picture and numbers: held-out reconstructions and samples.

Held-out crops: four base x base crops of each photo in `sources.DEMO_HELD_OUT`,
which stage 1 never sees; base is `eval.scale_consistency_base`, the demo's
encoder input size. The autoencoder is convolutional, so it encodes a crop at
base resolution directly; its feature map is rendered at base (1x) and at each
of `eval.scale_factors` (k). Reported: reconstruction PSNR at base; scale
consistency (`scale_consistency`: the k-x renders box-downsampled to base vs
the base render); and, at the largest k (K), PSNR against the same crop of the
photo at K x base, for the render and for PIL bicubic of the base input. The
sheet (`<workdir>/contact_sheet.png`) has one row per crop: input and 1x
render (each enlarged K times, nearest), the K-x render, the photo at K x base;
then rows of samples: each sample at base (enlarged, nearest) next to its K-x
rendering (`<workdir>/samples/<base>` and `<K * base>`).
"""

import json
import logging
import os
import pathlib

import jax
import ml_collections
import numpy as np
from PIL import Image

from infd_jax.data import sources
from infd_jax.evaluation import fidelity, metrics, scale_consistency
from infd_jax.rendering import pixels
from infd_jax import inference

log = logging.getLogger(__name__)


def held_out_photo_crops(base: int) -> np.ndarray:
  """uint8 [4 * n_photos, base, base, 3]: the quadrants of each held-out photo at 2*base."""
  out = []
  for name in sources.DEMO_HELD_OUT:
    img = Image.open(os.path.join(sources.demo_source_dir(), name)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    a = np.asarray(img.resize((2 * base, 2 * base), Image.Resampling.LANCZOS))
    out += [a[i:i + base, j:j + base] for i in (0, base) for j in (0, base)]
  return np.stack(out)


def held_out_crops(base: int) -> np.ndarray:
  """`held_out_photo_crops` as float32 in [-1, 1]."""
  return held_out_photo_crops(base).astype(np.float32) * (2.0 / 255.0) - 1.0


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        mesh: jax.sharding.Mesh) -> tuple[pathlib.Path, dict[str, float]]:
  """Writes the contact sheet and `<workdir>/demo.json`; returns (sheet path, numbers)."""
  workdir = pathlib.Path(workdir)
  base = config.eval.scale_consistency_base
  factors = tuple(config.eval.scale_factors)
  model = inference.load_model(config, workdir, mesh, need_dm=False)
  photo = held_out_photo_crops(base)
  crops = held_out_crops(base)
  z = model.encode(crops)
  renders = {}

  def render(size: int) -> np.ndarray:
    if size not in renders:
      renders[size] = model.render(z, (size, size))  # clipped, as saved images are
    return renders[size]

  numbers = {f"recon_psnr_{base}": float(np.mean(metrics.psnr(render(base), crops)))}
  numbers |= scale_consistency.scale_consistency(render, base, factors)
  k = max(factors)
  truth = held_out_photo_crops(k * base)
  big = pixels.to_uint8(render(k * base))
  bicubic = fidelity.upsample(photo, k * base, "bicubic")
  numbers[f"psnr_x{k}_vs_photo"] = float(np.mean(fidelity.psnr(big, truth)))
  numbers[f"bicubic_psnr_x{k}_vs_photo"] = float(np.mean(fidelity.psnr(bicubic, truth)))
  rows = [np.concatenate([_enlarge(p, k), _enlarge(pixels.to_uint8(rec), k), b, t], axis=1)
          for p, rec, b, t in zip(photo, render(base), big, truth)]
  rows += _sample_rows(workdir / "samples", base, k)
  sheet = workdir / "contact_sheet.png"
  if jax.process_index() == 0:
    Image.fromarray(np.concatenate(rows, axis=0)).save(sheet)
    (workdir / "demo.json").write_text(json.dumps(numbers, indent=1))
  log.info("contact sheet %s: %s", sheet, numbers)
  return sheet, numbers


def _enlarge(image: np.ndarray, k: int) -> np.ndarray:
  """[h, w, c] -> [k*h, k*w, c], each pixel repeated k x k times (nearest)."""
  return image.repeat(k, axis=0).repeat(k, axis=1)


def _sample_rows(folder: pathlib.Path, base: int, k: int) -> list[np.ndarray]:
  """Rows of (sample at base enlarged k times, its k*base rendering), two samples per row."""
  pairs = []
  for small_png in sorted((folder / str(base)).glob("*.png"), key=lambda p: int(p.stem)):
    large = np.asarray(Image.open(folder / str(k * base) / small_png.name))
    pairs.append(np.concatenate([_enlarge(np.asarray(Image.open(small_png)), k), large], axis=1))
  if len(pairs) % 2:  # (none when only stage 1 has run)
    pairs.append(np.zeros_like(pairs[0]))
  return [np.concatenate(pairs[i:i + 2], axis=1) for i in range(0, len(pairs), 2)]
