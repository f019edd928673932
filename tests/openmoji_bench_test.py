"""The OpenMoji benchmark: its metric helpers against float64 references, and the script end
to end on the session's 3-step model (`tiny_trained`) with a handful of emoji SVGs."""

import json

import numpy as np
from PIL import Image
import pytest

import infd_jax
from infd_jax.data import openmoji
from infd_jax.evaluation import fidelity


def test_psnr_is_the_float64_formula_on_either_image_convention():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
  expected = [10 * np.log10(1 / np.mean(((x.astype(np.float64) - y) / 255) ** 2))
              for x, y in zip(a, b)]
  np.testing.assert_allclose(fidelity.psnr(a, b), expected, rtol=1e-12)
  as_float = (a.astype(np.float32) / 127.5 - 1)
  np.testing.assert_allclose(fidelity.psnr(as_float, b), expected, rtol=1e-6)
  assert fidelity.psnr(a, a)[0] == np.inf


def test_upsample_is_pil_of_each_image_and_refuses_unknown_methods():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  up = fidelity.upsample(x, 20, "lanczos")
  assert up.shape == (2, 20, 20, 3)
  np.testing.assert_array_equal(
      up[1], np.asarray(Image.fromarray(x[1]).resize((20, 20), Image.Resampling.LANCZOS)))
  with pytest.raises(ValueError, match="nearest"):
    fidelity.upsample(x, 20, "nearest")
  with pytest.raises(TypeError, match="uint8"):
    fidelity.upsample(x / 127.5 - 1, 20, "bicubic")


def test_crops_are_fixed_per_size_and_inside_the_image():
  boxes = fidelity.crop_boxes(50, 100, 30, seed=3)
  np.testing.assert_array_equal(boxes, fidelity.crop_boxes(50, 100, 30, seed=3))
  assert boxes.min() >= 0 and boxes.max() <= 70 and len(np.unique(boxes[:, 0])) > 10
  images = np.arange(2 * 100 * 100 * 3).reshape(2, 100, 100, 3)
  out = fidelity.crops(images, boxes[:2], 30)
  np.testing.assert_array_equal(out[1], images[1, boxes[1, 0]:boxes[1, 0] + 30,
                                              boxes[1, 1]:boxes[1, 1] + 30])
  assert fidelity.crops(images, fidelity.crop_boxes(2, 100, 128, 0), 128).shape == (2, 100, 100, 3)


def test_nearest_is_the_brute_force_float64_minimum():
  rng = np.random.default_rng(2)
  refs = rng.integers(0, 256, (37, 6, 6, 3), dtype=np.uint8)
  queries = np.concatenate([refs[[5, 30]], rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)])
  index, mse = fidelity.nearest(queries, refs, chunk=8)
  q, r = queries.astype(np.float64) / 255, refs.astype(np.float64) / 255
  d = ((q[:, None] - r[None]) ** 2).mean(axis=(2, 3, 4))
  np.testing.assert_array_equal(index, d.argmin(axis=1))
  np.testing.assert_allclose(mse, d.min(axis=1), atol=1e-12)
  assert list(index[:2]) == [5, 30] and np.all(mse[:2] < 1e-12)


def test_batched_pads_the_last_batch_and_keeps_order():
  calls = []

  def fn(x, y):
    calls.append(len(x))
    return x[:, 0] + y[:, 0]
  a, b = np.arange(7.0)[:, None], 10 * np.arange(7.0)[:, None]
  np.testing.assert_array_equal(fidelity.batched(fn, a, b, 3), 11 * np.arange(7.0))
  assert calls == [3, 3, 3]


def test_benchmark_runs_end_to_end_and_writes_its_table(tiny_trained, svgs, tmp_path, capsys):
  """The whole script on the session's 3-step model, at a 16 px base (renders up to 256 px)."""
  from bench import openmoji as bench  # pylint: disable=g-import-not-at-top
  sheet = tmp_path / "sheet.jpg"
  results = bench.main([f"--workdir={tiny_trained}", f"--out={tmp_path}", f"--source={svgs}",
                        "--base=16", "--num=2", "--factors=1,4,16", "--crop=32", "--samples=8",
                        "--inverse_num=1", "--inverse_factors=8", f"--sheet={sheet}"])
  saved = json.loads((tmp_path / "openmoji.json").read_text())
  assert {(r["k"], r["method"]) for r in saved["fidelity"]} == {
      (k, m) for k in (1, 4, 16) for m in ("infd", "bicubic", "lanczos")}
  for r in saved["fidelity"]:  # at k = 1 the baselines are the input itself: infinite PSNR
    identity = r["k"] == 1 and r["method"] != "infd"
    assert np.isfinite(r["psnr"]) != identity and 0 <= r["lpips"] < 2
  # Bicubic of the 16 px input, scored independently here against the SVG truth at 64.
  names = openmoji.split_names(openmoji.list_names(str(svgs)))[1][:2]
  inp, gt = (openmoji.ground_truth(names, s, str(svgs)) for s in (16, 64))
  bicubic = np.stack([np.asarray(Image.fromarray(x).resize((64, 64), Image.Resampling.BICUBIC))
                      for x in inp]).astype(np.float64)
  expected = np.mean([10 * np.log10(1 / np.mean(((b - g) / 255) ** 2)) for b, g in zip(bicubic, gt)])
  got = next(r for r in saved["fidelity"] if (r["k"], r["method"]) == (4, "bicubic"))
  assert got["psnr"] == pytest.approx(expected, rel=1e-9)
  assert [r["k"] for r in saved["consistency"]] == [4, 16]
  assert {(r["set"], r["size"]) for r in saved["samples"]} == {
      (s, size) for s in ("samples", "training emoji (floor)") for size in (16, 64)}
  assert {(r["task"], r["method"]) for r in saved["inverse"]} == {
      ("8x super-resolution", "guided"), ("8x super-resolution", "bicubic"),
      ("8x super-resolution", "encoder"),
      ("inpainting (24 px box)", "guided"), ("inpainting (24 px box)", "unguided sample")}
  assert results["copies"]["held_out_nn_psnr_median"] > 0
  with Image.open(sheet) as img:
    assert img.size == (8 * 64, (2 + 2) * 64)  # 2 held-out rows, 4 samples x 3 sizes in 2
  assert "| 4 | 64 |" in capsys.readouterr().out


def test_colour_rank_reports_the_pixels_colour_eigenvalues(tiny_trained, svgs, capsys):
  from bench import colour_rank  # pylint: disable=g-import-not-at-top
  out = colour_rank.main([f"--workdir={tiny_trained}", f"--source={svgs}", "--num=3",
                          "--size=16"])
  names = openmoji.split_names(openmoji.list_names(str(svgs)))[1][:3]
  rgb = openmoji.ground_truth(names, 16, str(svgs)).reshape(-1, 3).astype(np.float64) / 127.5 - 1
  expected = np.sort(np.linalg.eigvalsh(np.cov(rgb, rowvar=False)))[::-1]
  np.testing.assert_allclose(out["pixel_colour_eigenvalues"], expected, atol=1e-4)
  sv = np.asarray(out["latent_singular_values"])
  z_channels = infd_jax.load(tiny_trained).config.ae.z_channels
  assert len(sv) == z_channels and np.all(np.diff(sv) <= 0) and sv[-1] >= 0
  assert len(out["colour_explained_by_1x_render"]) == 3
  assert '"pixel_colour_eigenvalues"' in capsys.readouterr().out
