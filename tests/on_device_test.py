"""The device half of the stage-1 pipeline: uint8 images and crops -> float images and grids."""

import jax
import numpy as np

from infd_jax.data import transforms
from infd_jax.training import on_device
from infd_jax.rendering import coords


def test_exact_ratio_is_the_correctly_rounded_quotient():
  r = np.arange(1, 1100, dtype=np.int32)[:, None]
  p = np.arange(0, 1100, dtype=np.int32)[None, :]
  got = np.asarray(jax.jit(coords.exact_ratio)(p, r))
  want = (p / r).astype(np.float32)  # float64 quotient, one rounding to float32
  valid = p <= r
  np.testing.assert_array_equal(got[valid], want[np.broadcast_to(valid, want.shape)])


def test_device_grids_equal_the_closed_form():
  # r = 384 puts pixel centres exactly on feature-cell boundaries (REFERENCE.md 11, pitfall 19).
  crops = np.asarray([[256, 0, 0], [384, 0, 128], [384, 77, 3], [1024, 768, 0],
                      [1024, 511, 767], [777, 500, 3], [257, 1, 0]], np.int32)
  p = 256
  coord, cell = jax.jit(coords.crop_coord_cell, static_argnums=1)(crops, p)
  a = np.arange(p, dtype=np.float64)
  for (r, ii, jj), c, ce in zip(crops, np.asarray(coord), np.asarray(cell)):
    rows = (2 * (ii + a + 0.5) / r - 1).astype(np.float32)
    cols = (2 * (jj + a + 0.5) / r - 1).astype(np.float32)
    np.testing.assert_array_equal(c[..., 0], np.broadcast_to(rows[:, None], (p, p)))
    np.testing.assert_array_equal(c[..., 1], np.broadcast_to(cols[None, :], (p, p)))
    np.testing.assert_array_equal(ce, np.float32(2 / r))


def test_ae_batch_images_equal_the_host_conversion():
  rng = np.random.default_rng(0)
  inp = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  gt = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
  out = jax.device_get(jax.jit(on_device.ae_batch)(
      {"inp": inp, "gt": gt, "crop": np.asarray([[40, 3, 9]], np.int32)}))
  np.testing.assert_array_equal(out["inp"], transforms.to_float(inp))
  np.testing.assert_array_equal(out["gt"], transforms.to_float(gt))
  # The official ToTensor + Normalize(0.5, 0.5) of the same uint8 values (float64), to
  # the host formula's two float32 roundings (<= 2 ulps of 1).
  np.testing.assert_allclose(out["inp"], (inp / 255.0 - 0.5) / 0.5, rtol=0, atol=2.5e-7)
  np.testing.assert_array_equal(out["coord"][0], transforms.patch_coord(40, 3, 9, 8))
  np.testing.assert_array_equal(out["cell"][0], transforms.patch_cell(40, 8))
