"""The demo's contact sheet: held-out crops within the trained scales, scored against the photo."""

import json
import os
import shutil

import numpy as np
from PIL import Image

import infd_jax
from infd_jax import sharding
from infd_jax.data import sources
from infd_jax.evaluation import contact_sheet


def _photo_quadrants(side: int) -> np.ndarray:
  """uint8 quadrants of the held-out photo's centre square resized to 2 * side (PIL only)."""
  out = []
  for name in sources.DEMO_HELD_OUT:
    img = Image.open(os.path.join(sources.demo_source_dir(), name)).convert("RGB")
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    a = np.asarray(img.crop((left, top, left + s, top + s)).resize((2 * side, 2 * side),
                                                                   Image.Resampling.LANCZOS))
    out += [a[i:i + side, j:j + side] for i in (0, side) for j in (0, side)]
  return np.stack(out)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean(np.square(a.astype(np.float64) / 255 - b.astype(np.float64) / 255), axis=(1, 2, 3))
  return float(np.mean(-10 * np.log10(mse)))


def test_sheet_renders_held_out_crops_at_1x_and_kx_beside_the_photo(tiny_trained, tmp_path):
  work = tmp_path / "work"
  shutil.copytree(tiny_trained, work)
  model = infd_jax.load(work)
  config = model.config
  base, k = 16, 2
  config.eval.update(scale_consistency_base=base, scale_factors=(k,))
  sheet, numbers = contact_sheet.run(config, work, sharding.make_mesh(-1, 1))

  truth = _photo_quadrants(k * base)
  inputs = _photo_quadrants(base)
  z = model.encode(inputs.astype(np.float32) / 127.5 - 1)
  render_1x = np.asarray(model.render(z, base))
  render_kx = np.asarray(model.render(z, k * base))
  to_u8 = lambda x: np.floor((np.clip(x, -1, 1) + 1) * 127.5 + 1e-4).astype(np.uint8)
  bicubic = np.stack([np.asarray(Image.fromarray(x).resize((k * base,) * 2, Image.BICUBIC))
                      for x in inputs])
  assert abs(numbers[f"psnr_x{k}_vs_photo"] - _psnr(to_u8(render_kx), truth)) < 0.05  # float32 renders
  assert abs(numbers[f"bicubic_psnr_x{k}_vs_photo"] - _psnr(bicubic, truth)) < 1e-6
  assert json.loads((work / "demo.json").read_text()) == numbers

  image = np.asarray(Image.open(sheet))
  side = k * base
  assert image.shape == (len(inputs) * side, 4 * side, 3)  # no samples in this workdir
  first = image[:side]
  enlarge = lambda x: x.repeat(k, axis=0).repeat(k, axis=1)
  np.testing.assert_array_equal(first[:, :side], enlarge(inputs[0]))
  assert np.abs(first[:, side:2 * side].astype(int) - enlarge(to_u8(render_1x[0]))).max() <= 1
  assert np.abs(first[:, 2 * side:3 * side].astype(int) - to_u8(render_kx[0])).max() <= 1
  np.testing.assert_array_equal(first[:, 3 * side:], truth[0])
