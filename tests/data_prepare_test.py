"""Preparing TFDS ArrayRecord datasets: bad inputs, reports, ffhq splits, 6K-Mix."""

import io
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
from PIL import Image
import pytest
import tifffile

from infd_jax.data import image_io
from infd_jax.data import parallel
from infd_jax.data import prepare
from infd_jax.data import sources

LANCZOS = Image.Resampling.LANCZOS
LIMITS = image_io.ImageLimits(min_side=32, max_side=48, max_pixels=20_000)


def _photo(w: int, h: int, name: str = "coffee.png") -> Image.Image:
  img = Image.open(os.path.join(sources.demo_source_dir(), name)).convert("RGB")
  return img.resize((w, h), LANCZOS)


def _png16_rgb(rgb: np.ndarray) -> bytes:
  """A 16-bit RGB PNG (PIL cannot write one)."""
  h, w, _ = rgb.shape
  raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

  def chunk(tag, data):
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


GRAY16 = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)
RGB16 = np.stack([GRAY16, GRAY16 // 2, 65535 - GRAY16], -1)


def _write_bad_folder(root: pathlib.Path) -> None:
  """One file per kind of input; the expected outcome is in the test below."""
  (root / "sub").mkdir(parents=True)
  _photo(40, 40).save(root / "ok.jpg", quality=90)
  _photo(71, 44).save(root / "sub" / "wide.png")
  _photo(40, 40).convert("L").save(root / "gray.png")
  _photo(40, 40).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
  rgba = np.zeros((40, 40, 4), np.uint8)
  rgba[:20] = (10, 200, 30, 255)    # top half opaque green
  rgba[20:] = (0, 0, 0, 0)          # bottom half transparent black
  Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
  Image.fromarray(GRAY16).save(root / "gray16.png")
  (root / "rgb16.png").write_bytes(_png16_rgb(RGB16))
  tifffile.imwrite(root / "float01.tif", (GRAY16 / 65535).astype(np.float32))
  tifffile.imwrite(root / "float_bad.tif", (GRAY16 * 2.0).astype(np.float32))
  _photo(40, 40).save(root / "photo.webp")
  _photo(40, 40).save(root / "photo.tiff")
  _photo(100, 20).save(root / "small.png")
  _photo(80, 80).save(root / "big.png")            # 6,400 pixels: downscaled to 48
  _photo(150, 150).save(root / "huge.png")         # 22,500 > max_pixels: skipped
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
  buf = io.BytesIO()
  _photo(40, 40).save(buf, format="JPEG")
  (root / "truncated.jpg").write_bytes(buf.getvalue()[:300])
  (root / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_src")
  _write_bad_folder(root)
  data_dir = tmp_path_factory.mktemp("bad_data")
  # PIL's decompression-bomb limit set below big.png (6,400 px): PIL alone would
  # raise DecompressionBombError (> 2x the limit); prepare must still cope.
  old = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = 1000
  try:
    report = prepare.prepare("image_folder", str(data_dir), source=str(root),
                             limits=LIMITS)
  finally:
    Image.MAX_IMAGE_PIXELS = old
  recs = sources.open_split(str(data_dir), "image_folder", "default", "train")
  stored = {}
  for i in range(len(recs)):
    rec = recs[i]
    stored[rec["name"].decode()] = rec
  return root, report, stored


def _pixels(rec) -> np.ndarray:
  img = Image.open(io.BytesIO(rec["image"]))
  assert img.mode == "RGB"
  arr = np.asarray(img)
  assert arr.shape == (rec["height"], rec["width"], 3)
  return arr.astype(np.int32)


def test_bad_inputs_have_documented_outcomes(bad_folder):
  root, report, stored = bad_folder
  skipped = {os.path.basename(p): why for p, why in report.skipped}
  assert set(skipped) == {"small.png", "huge.png", "corrupt.png", "truncated.jpg",
                          "float_bad.tif"}
  assert "too small" in skipped["small.png"] and "20 < min_side=32" in skipped["small.png"]
  assert "max_pixels" in skipped["huge.png"]
  assert skipped["corrupt.png"].startswith("cannot decode")
  assert skipped["truncated.jpg"].startswith("cannot decode")
  assert "outside [0, 1]" in skipped["float_bad.tif"]
  assert set(stored) == {"ok.jpg", "sub/wide.png", "gray.png", "palette.png",
                         "alpha.png", "gray16.png", "rgb16.png", "float01.tif",
                         "photo.webp", "photo.tiff", "big.png"}
  assert report.written == {"image_folder/default:train": 11}

  # Square RGB JPEG within limits: original bytes kept.
  assert stored["ok.jpg"]["image"] == (root / "ok.jpg").read_bytes()
  # Non-square: centre square crop, left (71-44)//2 = 13, top 0.
  wide = np.asarray(Image.open(root / "sub" / "wide.png"))
  np.testing.assert_array_equal(_pixels(stored["sub/wide.png"]), wide[:, 13:57])
  # Grayscale and palette: PIL's RGB conversion.
  for name in ("gray.png", "palette.png"):
    np.testing.assert_array_equal(_pixels(stored[name]),
                                  np.asarray(Image.open(root / name).convert("RGB")))
  # Alpha composited over white.
  alpha = _pixels(stored["alpha.png"])
  assert (alpha[:20] == (10, 200, 30)).all() and (alpha[20:] == 255).all()
  # 16-bit: round(v * 255 / 65535), not clipped.
  gray16 = _pixels(stored["gray16.png"])
  expected = np.round(GRAY16.astype(np.float64) * 255 / 65535).astype(np.int32)
  np.testing.assert_array_equal(gray16, np.stack([expected] * 3, -1))
  assert gray16.max() > 200 and len(np.unique(gray16)) > 100
  assert np.abs(_pixels(stored["rgb16.png"]) - np.round(RGB16 / 257)).max() <= 1
  np.testing.assert_array_equal(_pixels(stored["float01.tif"])[..., 0],
                                np.round(GRAY16 / 65535 * 255))
  # Beyond PIL's bomb limit and above max_side: LANCZOS-downscaled to 48.
  big = _pixels(stored["big.png"])
  ref = np.asarray(Image.open(root / "big.png").resize((48, 48), LANCZOS))
  np.testing.assert_array_equal(big, ref)
  for name in ("photo.webp", "photo.tiff"):
    assert stored[name]["height"] == 40


def test_report_summary_names_files_and_reasons(bad_folder):
  _, report, _ = bad_folder
  text = report.summary()
  assert "images written: 11" in text and "images skipped: 5" in text
  assert "corrupt.png: cannot decode" in text
  assert "wide.png: centre-cropped 71x44 to 44x44" in text
  assert "alpha.png: RGBA alpha composited over white" in text
  assert "gray16.png: 16-bit I;16 scaled to 8-bit" in text
  assert "big.png: downscaled 80 to max_side=48" in text


def _ffhq_folder(root: pathlib.Path, n: int) -> list[str]:
  names = [f"{i:05d}.png" for i in range(n)]
  for i, name in enumerate(names):
    sub = root / f"{(i // 5) * 1000:05d}"   # FFHQ ships in 1000-image subfolders
    sub.mkdir(parents=True, exist_ok=True)
    base = sources.DEMO_FILES[i % 4]
    _photo(64, 64, base).rotate(7 * i).save(sub / name)
  return names


def test_ffhq_official_lists_mix6k_and_lanczos256(tmp_path):
  names = _ffhq_folder(tmp_path / "src", 12)
  (tmp_path / "train.txt").write_text("\n".join(names[3:] + ["99999.png"]) + "\n")
  (tmp_path / "val.txt").write_text("\n".join(names[2::-1]) + "\n")
  mix = sources.MixSpec(num_hr=6, num_varied=5, res_lo=32, res_hi=64)
  data_dir = str(tmp_path / "data")
  report = prepare.prepare(
      "ffhq", data_dir, configs=["native", "lanczos256", "mix6k"],
      source=str(tmp_path / "src"), train_list=str(tmp_path / "train.txt"),
      val_list=str(tmp_path / "val.txt"), limits=image_io.ImageLimits(min_side=32),
      mix=mix)
  assert report.missing == ["99999.png"] and not report.skipped
  val = sources.open_split(data_dir, "ffhq", "native", "val")
  assert sorted(val[i]["name"].decode() for i in range(len(val))) == names[:3]
  assert len(sources.open_split(data_dir, "ffhq", "native", "train")) == 9
  lr = sources.open_split(data_dir, "ffhq", "lanczos256", "train+val")
  assert len(lr) == 12 and {lr[i]["height"] for i in range(12)} == {256}
  rec = sources.open_split(data_dir, "ffhq", "lanczos256", "val")[0]
  src = Image.open(tmp_path / "src" / "00000" / rec["name"].decode())
  np.testing.assert_array_equal(_pixels(rec), np.asarray(src.resize((256, 256), LANCZOS)))
  hr = sources.open_split(data_dir, "ffhq", "mix6k", "hr")
  sides = {hr[i]["name"].decode(): int(hr[i]["height"]) for i in range(len(hr))}
  # s = 32 + round(32 * idx / 4) for idx < 5, then native 64.
  assert sides == {"00000.png": 32, "00001.png": 40, "00002.png": 48,
                   "00003.png": 56, "00004.png": 64, "00005.png": 64}


def test_ffhq_seeded_split_without_lists(tmp_path, caplog):
  _ffhq_folder(tmp_path / "src", 14)
  data_dir = str(tmp_path / "data")
  with caplog.at_level("WARNING"):
    prepare.prepare("ffhq", data_dir, source=str(tmp_path / "src"),
                    limits=image_io.ImageLimits(min_side=32))
  assert "differs from the official" in caplog.text
  train = sources.open_split(data_dir, "ffhq", "native", "train")
  val = sources.open_split(data_dir, "ffhq", "native", "val")
  assert (len(train), len(val)) == (12, 2)   # round(14 / 7) val images
  got = {val[i]["name"].decode() for i in range(len(val))}
  assert got == set(sources.seeded_split([f"{i:05d}.png" for i in range(14)], 0)[1])
  assert sources.seeded_split([str(i) for i in range(70000)], 0)[1].__len__() == 10000


def test_demo_ensure_prepared_and_cli(tmp_path, capsys):
  data_dir = str(tmp_path)
  prepare.ensure_prepared("demo", data_dir)
  recs = sources.open_split(data_dir, "demo", "default", "train")
  assert len(recs) == len(sources.DEMO_FILES)
  sides = {int(recs[i]["height"]) for i in range(len(recs))}
  assert min(sides) == 300 and max(sides) == 1411   # native, mixed resolutions
  prepare.ensure_prepared("demo", data_dir)         # no-op once prepared
  with pytest.raises(FileNotFoundError, match="no source"):
    prepare.ensure_prepared("image_folder", data_dir)
  src = tmp_path / "src"
  src.mkdir()
  _photo(40, 50).save(src / "a.png")
  (src / "b.png").write_bytes(b"garbage")
  report = prepare.main(["--dataset=image_folder", f"--source={src}",
                         f"--data_dir={data_dir}", "--config=mine", "--min_side=32"])
  out = capsys.readouterr().out
  assert "images written: 1" in out and "images skipped: 1" in out and "b.png" in out
  assert report.written == {"image_folder/mine:train": 1}


def test_prepare_and_read_work_without_tensorflow(tmp_path):
  """Prepare + pipeline in a fresh process; TensorFlow must never be imported.

  The pinned environment has no TensorFlow at all (then this also shows that
  nothing needs it); where it is installed, the check is that it stays unloaded.
  """
  script = textwrap.dedent(f"""
      import importlib.util, sys
      tf_installed = importlib.util.find_spec("tensorflow") is not None
      from infd_jax.data import pipeline, prepare
      prepare.prepare("demo", {str(tmp_path)!r})
      cfg = dict(name="demo", data_dir={str(tmp_path)!r}, patch=32, gt_res_min=32,
                 inp_res=32, num_workers=0)
      batch = next(iter(pipeline.make_ae_dataset(cfg, global_batch_size=2, seed=0)))
      assert batch["gt"].shape == (2, 32, 32, 3), batch["gt"].shape
      assert "tensorflow" not in sys.modules
      print("OK tensorflow installed:", tf_installed)
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).parents[1], timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_data_package_does_not_import_jax():
  pkg = pathlib.Path(sources.__file__).parent
  for path in pkg.glob("*.py"):
    text = path.read_text()
    assert "import jax" not in text and "from jax" not in text, path


def test_parallel_prepare_writes_the_same_records_and_report(bad_folder, tmp_path):
  root, serial_report, serial = bad_folder
  report = prepare.prepare("image_folder", str(tmp_path), source=str(root), limits=LIMITS,
                           workers=2)
  recs = sources.open_split(str(tmp_path), "image_folder", "default", "train")
  names = [recs[i]["name"].decode() for i in range(len(recs))]
  assert names == sorted(serial)  # written in sorted source order, as serially
  for i, name in enumerate(names):
    assert recs[i]["image"] == serial[name]["image"], name
  assert report.written == serial_report.written
  assert sorted(report.skipped) == sorted(serial_report.skipped)
  assert sorted(report.changed) == sorted(serial_report.changed)


def _item_and_pid(x: int) -> tuple[int, int]:
  return x, os.getpid()


def test_ordered_map_keeps_order_across_worker_processes():
  with parallel.spawn_pool(2) as pool:
    out = list(parallel.ordered_map(_item_and_pid, range(40), pool, ahead=8))
  assert [x for x, _ in out] == list(range(40))
  assert os.getpid() not in {pid for _, pid in out}
  assert list(parallel.ordered_map(_item_and_pid, range(3), None, ahead=8)) == [
      (x, os.getpid()) for x in range(3)]


def test_prepare_reads_a_gs_source_and_checks_a_gs_data_dir(tmp_path):
  """Source images on `gs://` (an in-memory gcs filesystem) are listed and read remotely;
  a dataset prepared under a `gs://` data_dir is recognised there."""
  from tests import fake_gcs  # pylint: disable=g-import-not-at-top
  expected = {"a.png": _photo(40, 40), "wide.png": _photo(60, 40, "astronaut.png")}
  with fake_gcs.installed() as fs:
    for i, (name, img) in enumerate(expected.items()):
      buf = io.BytesIO()
      img.save(buf, format="PNG")
      fs().pipe(f"gs://bucket/src/{'sub/' * i}{name}", buf.getvalue())
    prepare.prepare("image_folder", str(tmp_path), source="gs://bucket/src", limits=LIMITS)
    assert not sources.is_prepared("gs://bucket/data", "image_folder", "default")
    info = f"gs://bucket/data/image_folder/default/{sources.VERSION}/dataset_info.json"
    fs().pipe(info, b"{}")
    assert sources.is_prepared("gs://bucket/data", "image_folder", "default")
  recs = sources.open_split(str(tmp_path), "image_folder", "default", "train")
  stored = {recs[i]["name"].decode(): recs[i] for i in range(len(recs))}
  assert set(stored) == {"a.png", "sub/wide.png"}
  np.testing.assert_array_equal(_pixels(stored["a.png"]), np.asarray(expected["a.png"]))
  # The centre square of the 60 x 40 image, cropped in numpy.
  np.testing.assert_array_equal(_pixels(stored["sub/wide.png"]),
                                np.asarray(expected["wide.png"])[:, 10:50])
