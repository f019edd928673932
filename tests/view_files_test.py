"""The viewer without a model: PNG folders and BigTIFF pyramids as deep-zoom images."""

import io
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from infd_jax import checks
from infd_jax.view import batching, caches, file_source, server, tiles
from tests import view_support

TILE = 64


def _pyramid_tiff(path, levels, tile=32):
  """A tiled BigTIFF with SubIFD overviews, the layout of `rendering/stream.py`."""
  options = dict(tile=(tile, tile), photometric="rgb", compression="zlib")
  with tifffile.TiffWriter(path, bigtiff=True) as tif:
    tif.write(levels[0], subifds=len(levels) - 1, **options)
    for level in levels[1:]:
      tif.write(level, subfiletype=1, **options)


def _box_reduce(image: np.ndarray, factor: int) -> np.ndarray:
  """Mean of factor x factor blocks (partial blocks at the far edges), float64."""
  h, w = image.shape[:2]
  out = np.zeros((-(-h // factor), -(-w // factor), 3))
  for r in range(out.shape[0]):
    for c in range(out.shape[1]):
      out[r, c] = image[r * factor:(r + 1) * factor, c * factor:(c + 1) * factor].mean((0, 1))
  return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
  """A folder with a 150 x 200 PNG and a 3-level BigTIFF (200 x 260, 100 x 130, 50 x 65)."""
  folder = tmp_path_factory.mktemp("outputs")
  rng = np.random.default_rng(0)
  png = rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)
  Image.fromarray(png).save(folder / "0.png")
  levels = [rng.integers(0, 256, (200 // 2 ** k, 260 // 2 ** k, 3), dtype=np.uint8)
            for k in range(3)]
  _pyramid_tiff(folder / "big.tif", levels)
  (folder / "notes.txt").write_text("not an image")
  return folder, png, levels


@pytest.fixture(scope="module")
def files_server(outputs, tmp_path_factory):
  source = file_source.FileSource(outputs[0])
  service = tiles.TileService(source, caches.DiskCache(tmp_path_factory.mktemp("cache"), 1 << 20),
                              batching.Batcher(source.render), tile_size=TILE, overlap=1)
  with view_support.ServerThread(server.make_app(service, {"size": 0, "seed": 0})) as running:
    yield running


def _tile(files_server, name, level, col, row):
  status, body = files_server.get(f"dzi/{name}/full_files/{level}/{col}_{row}.png")
  assert status == 200, body
  return np.asarray(Image.open(io.BytesIO(body)))


def test_info_lists_the_images(files_server):
  info = json.loads(files_server.get("api/info")[1])
  assert info["kind"] == "files" and info["images"] == ["0.png", "big.tif"]


def test_png_tiles_are_crops_of_the_image_and_of_its_box_reductions(files_server, outputs):
  _, png, _ = outputs
  # 200 px wide: max level 8; tile (1, 1) of level 8 covers rows and columns 63..128.
  np.testing.assert_array_equal(_tile(files_server, "0.png", 8, 1, 1), png[63:129, 63:129])
  for level, factor in ((7, 2), (5, 8), (0, 256)):
    shown = _tile(files_server, "0.png", level, 0, 0)
    expected = _box_reduce(png, factor)[:TILE + 1, :TILE + 1]
    assert shown.shape == expected.shape
    assert np.abs(shown - expected).max() <= 1  # PIL rounds the block means


def test_tiff_tiles_read_each_stored_level_and_reduce_below_the_smallest(files_server, outputs):
  _, _, levels = outputs
  # 260 px wide: max level 9 is the full image, 8 and 7 are the stored overviews.
  np.testing.assert_array_equal(_tile(files_server, "big.tif", 9, 3, 2), levels[0][127:193, 191:257])
  np.testing.assert_array_equal(_tile(files_server, "big.tif", 8, 1, 0), levels[1][0:65, 63:129])
  np.testing.assert_array_equal(_tile(files_server, "big.tif", 7, 0, 0), levels[2][:, :65])
  shown = _tile(files_server, "big.tif", 5, 0, 0)  # 17 x 13: the 50 x 65 level reduced by 4
  expected = _box_reduce(levels[2], 4)
  assert shown.shape == expected.shape and np.abs(shown - expected).max() <= 1


def test_saved_view_of_a_file_resamples_the_region(files_server, outputs):
  _, png, _ = outputs
  # The right half of the PNG (1 wide, 0.75 high) saved 100 px wide is its columns
  # 100..199 at full scale: a crop.
  status, body = files_server.get("view.png?image=0.png&size=full&x=0.5&y=0&w=0.5&h=0.75"
                                  "&width=100")
  assert status == 200, body
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), png[:, 100:200])


@pytest.mark.parametrize("path,status", [
    ("dzi/none.png/full.dzi", 404),                 # no such file
    ("dzi/notes.txt/full.dzi", 404),                # not an image
    ("dzi/0.png/1024.dzi", 404),                    # a file has one size
    ("dzi/0.png/full_files/9/0_0.png", 404),        # past the deepest level (8)
    ("dzi/big.tif/full_files/9/5_0.png", 404),      # past the last column (4)
])
def test_files_bad_requests(files_server, path, status):
  assert files_server.get(path)[0] == status
  assert files_server.get("api/info")[0] == 200


def test_a_folder_without_images_is_a_user_error(tmp_path):
  (tmp_path / "a.txt").write_text("x")
  with pytest.raises(checks.UserError, match="no PNG, JPEG, WebP or TIFF image"):
    file_source.FileSource(tmp_path)
