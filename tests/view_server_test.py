"""The viewer's server on the tiny model: tiles and saved views equal `Model.render`,
concurrent requests are batched, the caches stay bounded, bad requests are refused."""

import concurrent.futures
import io
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

SIZE = 1024  # virtual size of the samples shown; DZI tiles of 128 px, overlap 1 (conftest)


def _uint8(images: np.ndarray) -> np.ndarray:
  """The official output conversion: floor(clip(x / 2 + 0.5, 0, 1) * 255)."""
  return np.floor(np.clip(images / 2 + 0.5, 0, 1) * 255).astype(np.uint8)


def _png(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _tile_window(size: int, level: int, col: int, row: int, tile: int = 128, overlap: int = 1):
  """(level side, window) of a DZI tile, from the DZI definition."""
  max_level = math.ceil(math.log2(size))
  side = math.ceil(size / 2 ** (max_level - level))
  top, left = max(0, row * tile - overlap), max(0, col * tile - overlap)
  bottom, right = min(side, (row + 1) * tile + overlap), min(side, (col + 1) * tile + overlap)
  return side, (top, left, bottom - top, right - left)


@pytest.fixture(scope="module")
def latents(view_server):
  """Samples 0 and 1 of seed 3, from the public API."""
  return view_server.model.sample(2, seed=3)


def test_descriptor_names_the_pyramid(view_server):
  status, body = view_server.get(f"dzi/3-0/{SIZE}.dzi")
  assert status == 200
  image = ET.fromstring(body)
  assert image.tag.endswith("Image") and image.get("TileSize") == "128"
  assert image.get("Overlap") == "1" and image.get("Format") == "png"
  size = image[0]
  assert (size.get("Width"), size.get("Height")) == (str(SIZE), str(SIZE))


@pytest.mark.parametrize("level,col,row", [(10, 3, 5), (10, 7, 7), (9, 0, 3), (6, 0, 0),
                                           (0, 0, 0)])
def test_tiles_equal_model_render_of_their_windows(view_server, latents, level, col, row):
  status, body = view_server.get(f"dzi/3-1/{SIZE}_files/{level}/{col}_{row}.png")
  assert status == 200, body
  side, window = _tile_window(SIZE, level, col, row)
  expected = _uint8(view_server.model.render(latents[1:2], side, window=window)[0])
  np.testing.assert_array_equal(_png(body), expected)


def test_concurrent_requests_are_batched_and_then_served_from_disk(view_server, latents):
  # All of level 9 (512 px) of the 4096 px image: a size no other test requests (the browser
  # test shows 2048 px), so none of these tiles is on disk yet whatever ran before.
  size, level, tiles = 4 * SIZE, 9, [(c, r) for c in range(4) for r in range(4)]
  before = dict(view_server.service.batcher.stats)
  paths = [f"dzi/3-0/{size}_files/{level}/{c}_{r}.png" for c, r in tiles] * 2  # duplicates too
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    answers = list(pool.map(view_server.get, paths))
  assert [status for status, _ in answers] == [200] * len(paths)
  stats = view_server.service.batcher.stats
  calls = stats["render_calls"] - before.get("render_calls", 0)
  assert 1 <= calls < len(tiles), stats  # fewer render calls than distinct tiles
  full = _uint8(view_server.model.render(latents[:1], 512)[0])
  for (c, r), (_, body) in zip(tiles, answers):
    _, (top, left, h, w) = _tile_window(size, level, c, r)
    np.testing.assert_array_equal(_png(body), full[top:top + h, left:left + w])
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    again = list(pool.map(view_server.get, paths))
  assert again == answers
  assert view_server.service.batcher.stats["render_calls"] == stats["render_calls"]


def test_saved_view_is_the_region_rendered_at_the_saved_scale(view_server, latents):
  # The region x in [0.25, 0.75), y in [0.5, 0.75) of sample 3-0, saved 200 px wide: the
  # image 400 px wide, rows 200..299 and columns 100..299 of it.
  status, body = view_server.get(
      f"view.png?image=3-0&size={SIZE}&x=0.25&y=0.5&w=0.5&h=0.25&width=200")
  assert status == 200, body
  expected = _uint8(view_server.model.render(latents[:1], 400, window=(200, 100, 100, 200))[0])
  np.testing.assert_array_equal(_png(body), expected)


def test_feature_maps_and_disk_stay_within_their_bounds(view_server):
  source, disk = view_server.service.source, view_server.service.disk
  for seed in (11, 12, 13):  # three more samples than the two feature maps kept
    assert view_server.get(f"dzi/{seed}-0/{SIZE}_files/5/0_0.png")[0] == 200
    assert source.cached_samples <= 2
  assert 0 < disk.total_bytes <= disk.max_bytes
  on_disk = sum(p.stat().st_size for p in disk.root.rglob("*") if p.is_file())
  assert on_disk == disk.total_bytes


BAD_REQUESTS = [  # (path, status): 20 kinds of mistakes
    ("dzi/3-0/1024_files/x/0_0.png", 400),            # level not a number
    ("dzi/3-0/1024_files/11/0_0.png", 404),           # level past the deepest (10)
    ("dzi/3-0/1024_files/99999999999999/0_0.png", 400),  # level absurdly large
    ("dzi/3-0/1024_files/-1/0_0.png", 400),           # negative level
    ("dzi/3-0/1024_files/10/8_0.png", 404),           # column past the last (7)
    ("dzi/3-0/1024_files/10/0_8.png", 404),           # row past the last
    ("dzi/3-0/1024_files/10/a_0.png", 400),           # column not a number
    ("dzi/3-0/1024_files/10/0_-3.png", 400),          # negative row
    ("dzi/3-0/1024_files/10/0_0.jpg", 404),           # a format not served
    ("dzi/3-0/1024_files/10/00.png", 404),            # no column_row
    ("dzi/abc/1024.dzi", 400),                        # sample not <seed>-<index>
    ("dzi/3-x/1024.dzi", 400),                        # index not a number
    ("dzi/99999999999-0/1024.dzi", 400),              # seed out of range
    ("dzi/3-0/0.dzi", 400),                           # size 0
    ("dzi/3-0/2097152.dzi", 400),                     # size above 2^20
    ("dzi/3-0/1e3.dzi", 400),                         # size not an integer
    ("view.png?image=3-0&size=1024&x=0&y=0&w=0&h=1&width=64", 400),   # empty region
    ("view.png?image=3-0&size=1024&x=0&y=0&w=1&h=1&width=100000", 400),  # too wide
    ("view.png?image=3-0&size=1024&x=nan&y=0&w=1&h=1&width=64", 400),    # not finite
    ("view.png?image=3-0&size=1024&x=5&y=5&w=1&h=1&width=64", 400),   # outside the image
    ("view.png?image=3-0&size=1024", 400),            # missing fields
    ("static/../infd_jax/view/cli.py", 404),          # outside the static folder
    ("nowhere", 404),                                 # no such route
]


def test_bad_requests_are_refused_and_the_server_stays_up(view_server):
  assert len(BAD_REQUESTS) >= 20
  for path, expected in BAD_REQUESTS:
    status, body = view_server.get(path)
    assert status == expected, (path, status, body[:200])
    assert view_server.get("api/info")[0] == 200, path
  assert view_server.get(f"dzi/3-0/{SIZE}_files/4/0_0.png")[0] == 200


def test_info_describes_the_source_and_tiling(view_server):
  status, body = view_server.get("api/info")
  info = json.loads(body)
  assert status == 200 and info["kind"] == "model" and info["tile_size"] == 128
  assert info["max_size"] == 2 ** 20 and info["defaults"] == {"size": 1024, "seed": 0}
  assert view_server.get("")[0] == 200
  assert view_server.get("static/openseadragon/openseadragon.min.js")[0] == 200


def test_bigtiff_written_by_the_sampler_shows_the_field_at_every_stored_level(
    view_server, latents, tmp_path):
  from infd_jax.rendering import stream  # pylint: disable=g-import-not-at-top
  from infd_jax.view import file_source  # pylint: disable=g-import-not-at-top
  model = view_server.model
  phi = model.phi_row(model.decode_global(latents[:1]), 0)
  stream.write_bigtiff(tmp_path / "0.tif", model.renderer, {"params": model.ae_params}, phi,
                       (256, 256))
  source = file_source.FileSource(tmp_path / "0.tif")
  ref = source.image("0.tif", "full")
  for level, side in ((8, 256), (7, 128), (5, 32), (4, 16)):  # stored: 256 down to 16
    window = _tile_window(256, level, 1 if side > 128 else 0, 0)[1]
    expected = _uint8(model.render(latents[:1], side, window=window)[0])
    np.testing.assert_array_equal(source.render(ref, (side, side), window), expected)


def test_one_device_hosts_render_the_tiles_model_render_gives(tiny_trained):
  """On one device (a GPU host), the cached-phi path still equals Model.render."""
  import infd_jax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from infd_jax import sharding  # pylint: disable=g-import-not-at-top
  from infd_jax.view import model_source  # pylint: disable=g-import-not-at-top
  model = infd_jax.load(tiny_trained, mesh=sharding.make_mesh(devices=jax.devices()[:1]))
  source = model_source.ModelSource(model)
  ref = source.image("5-1", "96")
  window = (20, 44, 40, 52)
  expected = _uint8(model.render(model.sample(2, seed=5)[1:], 96, window=window)[0])
  np.testing.assert_array_equal(source.render(ref, (96, 96), window), expected)
