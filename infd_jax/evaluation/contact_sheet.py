"""The demo's closing picture and numbers: held-out reconstructions and samples.

Held-out crops: four base x base crops of each photo in `sources.DEMO_HELD_OUT`,
which stage 1 never sees. The autoencoder is convolutional, so it encodes a
crop at base resolution directly; its feature map is rendered at base (1x) and
at 2x and 4x. Reported: reconstruction PSNR at base, and scale consistency
(`scale_consistency`: the 2x and 4x renders box-downsampled to base vs the base
render). The sheet (`<workdir>/contact_sheet.png`) has one row per crop: input,
reconstruction at 1x, the centre of the 4x render (a base-pixel window, i.e. 4x
zoom) and the 4x render box-downsampled to 1x; then rows of samples: each
sample at base next to the centre of its 4x rendering.
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
from infd_jax.evaluation import metrics, scale_consistency
from infd_jax.rendering import pixels
from infd_jax import inference


def held_out_crops(base: int) -> np.ndarray:
  """[4 * n_photos, base, base, 3] in [-1, 1]: the quadrants of each held-out photo at 2*base."""
  out = []
  for name in sources.DEMO_HELD_OUT:
    img = Image.open(os.path.join(sources.demo_source_dir(), name)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    a = np.asarray(img.resize((2 * base, 2 * base), Image.Resampling.LANCZOS), np.float32)
    a = a * (2.0 / 255.0) - 1.0
    out += [a[i:i + base, j:j + base] for i in (0, base) for j in (0, base)]
  return np.stack(out)


def _centre(images: np.ndarray, side: int) -> np.ndarray:
  top = (images.shape[1] - side) // 2
  left = (images.shape[2] - side) // 2
  return images[:, top:top + side, left:left + side]


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        mesh: jax.sharding.Mesh) -> tuple[pathlib.Path, dict[str, float]]:
  """Writes the contact sheet and `<workdir>/demo.json`; returns (sheet path, numbers)."""
  workdir = pathlib.Path(workdir)
  base = config.eval.scale_consistency_base
  factors = tuple(config.eval.scale_factors)
  model = inference.load_model(config, workdir, mesh, need_dm=False)
  crops = held_out_crops(base)
  z = model.encode(crops)
  renders = {}

  def render(size: int) -> np.ndarray:
    if size not in renders:
      renders[size] = model.render(z, (size, size))  # clipped, as saved images are
    return renders[size]

  numbers = {f"recon_psnr_{base}": float(np.mean(metrics.psnr(render(base), crops)))}
  numbers |= scale_consistency.scale_consistency(render, base, factors)
  big = render(max(factors) * base)
  down = np.asarray(scale_consistency.downsample(big, max(factors)))
  rows = [np.concatenate([pixels.to_uint8(x) for x in (crop, rec, zoom, d)], axis=1)
          for crop, rec, zoom, d in zip(crops, render(base), _centre(big, base), down)]
  rows += _sample_rows(workdir / "samples", base, max(factors) * base)
  sheet = workdir / "contact_sheet.png"
  if jax.process_index() == 0:
    Image.fromarray(np.concatenate(rows, axis=0)).save(sheet)
    (workdir / "demo.json").write_text(json.dumps(numbers, indent=1))
  logging.info("contact sheet %s: %s", sheet, numbers)
  return sheet, numbers


def _sample_rows(folder: pathlib.Path, base: int, big: int) -> list[np.ndarray]:
  """Rows of (sample at base, centre of its big rendering), two samples per row."""
  pairs = []
  for small_png in sorted((folder / str(base)).glob("*.png"), key=lambda p: int(p.stem)):
    large = np.asarray(Image.open(folder / str(big) / small_png.name))
    pairs.append(np.concatenate([np.asarray(Image.open(small_png)),
                                 _centre(large[None], base)[0]], axis=1))
  if len(pairs) % 2:  # (none when only stage 1 has run)
    pairs.append(np.zeros_like(pairs[0]))
  return [np.concatenate(pairs[i:i + 2], axis=1) for i in range(0, len(pairs), 2)]
