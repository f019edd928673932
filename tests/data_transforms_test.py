"""Per-example transforms: r sampling, coord/cell formulas, fast patch path."""

import io
import os

import numpy as np
from PIL import Image
import pytest

from infd_jax.data import sources
from infd_jax.data import transforms

LANCZOS = Image.Resampling.LANCZOS


def _photo(side: int, name: str = "astronaut.png") -> Image.Image:
  img = Image.open(os.path.join(sources.demo_source_dir(), name)).convert("RGB")
  return img.resize((side, side), LANCZOS)


def _record(img: Image.Image) -> dict:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return {"image": buf.getvalue(), "name": "x"}


def test_resolution_hits_both_ends_and_stays_in_range():
  rng = np.random.default_rng(0)
  kw = dict(patch=32, gt_res_min=32, gt_res_max=36, p_whole=0.0, p_max=0.0)
  rs = [transforms.sample_resolution(rng, 100, **kw) for _ in range(500)]
  assert set(rs) == {32, 33, 34, 35, 36}
  # The upper bound is min(S, gt_res_max): a 34-pixel image never gets r > 34.
  rs = [transforms.sample_resolution(rng, 34, **kw) for _ in range(300)]
  assert set(rs) == {32, 33, 34}


def test_resolution_p_whole_and_p_max():
  rng = np.random.default_rng(1)
  kw = dict(patch=32, gt_res_min=40, gt_res_max=80)
  assert {transforms.sample_resolution(rng, 64, p_whole=1.0, p_max=0.0, **kw)
          for _ in range(20)} == {32}
  assert {transforms.sample_resolution(rng, 64, p_whole=0.0, p_max=1.0, **kw)
          for _ in range(20)} == {64}
  rs = [transforms.sample_resolution(rng, 200, p_whole=0.0, p_max=0.5, **kw)
        for _ in range(2000)]
  # Half the draws take r = min(S, ub) = 80; the rest are uniform on [40, 80].
  assert 0.45 < np.mean(np.array(rs) == 80) < 0.58
  with pytest.raises(ValueError, match="below gt_res_min"):
    transforms.sample_resolution(rng, 39, p_whole=0.0, p_max=0.0, **kw)


@pytest.mark.parametrize("r,ii,jj,p", [(40, 3, 8, 32), (1000, 17, 744, 256), (384, 0, 128, 256)])
def test_coord_and_cell_formulas(r, ii, jj, p):
  coord = transforms.patch_coord(r, ii, jj, p)
  cell = transforms.patch_cell(r, p)
  assert coord.shape == (p, p, 2) and coord.dtype == np.float32
  for a, b in [(0, 0), (p - 1, 0), (0, p - 1), (p // 2, p // 3), (p - 1, p - 1)]:
    np.testing.assert_allclose(coord[a, b], [2 * (ii + a + 0.5) / r - 1,
                                             2 * (jj + b + 0.5) / r - 1], atol=1e-6)
  np.testing.assert_allclose(cell, 2.0 / r, rtol=1e-6)
  assert cell.shape == (p, p, 2) and cell.dtype == np.float32


def test_fast_patch_matches_resize_then_crop():
  rng = np.random.default_rng(2)
  for side, patch in [(96, 32), (77, 32), (512, 256)]:
    img = _photo(side)
    for _ in range(12 if side < 500 else 4):
      r = int(rng.integers(patch, 3 * side))
      ii, jj = (int(v) for v in rng.integers(0, r - patch, size=2, endpoint=True))
      fast = np.asarray(transforms.fast_patch(img, r, ii, jj, patch), np.int32)
      ref = np.asarray(transforms.resize_then_crop(img, r, ii, jj, patch), np.int32)
      assert fast.shape == ref.shape == (patch, patch, 3)
      assert np.abs(fast - ref).max() <= 1, (side, r, ii, jj)
  # r == S is a plain crop.
  img = _photo(64)
  np.testing.assert_array_equal(transforms.fast_patch(img, 64, 5, 9, 32),
                                np.asarray(img)[5:37, 9:41])


def test_ae_transform_example_contract():
  img = _photo(80)
  t = transforms.AeTransform(inp_res=48, patch=32, gt_res_min=32, gt_res_max=120)
  ex = t(_record(img), np.random.default_rng(3))
  assert set(ex) == {"inp", "gt", "crop"}
  assert ex["inp"].shape == (48, 48, 3) and ex["gt"].shape == (32, 32, 3)
  assert ex["inp"].dtype == ex["gt"].dtype == np.uint8 and ex["crop"].dtype == np.int32
  np.testing.assert_array_equal(ex["inp"], np.asarray(img.resize((48, 48), LANCZOS)))
  # Rebuild gt from the crop (r, ii, jj) by the reference path.
  r, ii, jj = (int(v) for v in ex["crop"])
  assert 32 <= r <= 80 and 0 <= ii <= r - 32 and 0 <= jj <= r - 32
  ref = np.asarray(transforms.resize_then_crop(img, r, ii, jj, 32), np.int16)
  assert np.abs(ex["gt"].astype(np.int16) - ref).max() <= 1


def test_lr_image_whole_crop_equals_inp():
  """An image of side 256 always gets r = 256, so gt is the whole image = inp."""
  img = _photo(256)
  t = transforms.AeTransform()
  ex = t(_record(img), np.random.default_rng(4))
  np.testing.assert_array_equal(ex["crop"], [256, 0, 0])
  np.testing.assert_array_equal(ex["gt"], ex["inp"])


def test_resize_option_and_dm_transform():
  img = _photo(90)
  ex = transforms.DmTransform(inp_res=32, resize=64)(_record(img), np.random.default_rng(0))
  ref = img.resize((64, 64), LANCZOS).resize((32, 32), LANCZOS)
  np.testing.assert_allclose(ex["inp"], np.asarray(ref, np.float32) / 127.5 - 1, atol=1e-6)
  assert set(ex) == {"inp"}


def test_pool_mix_draws_both_pools():
  lr = [{"pool": "lr"}] * 3
  hr = [{"pool": "hr"}] * 5
  mix = transforms.PoolMix(lambda rec, rng: rec["pool"], lr, hr, p_lr=0.5)
  rng = np.random.default_rng(5)
  picks = [mix(i, rng) for i in range(1000)]
  assert 0.44 < picks.count("lr") / 1000 < 0.56
