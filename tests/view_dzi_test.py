"""The viewer's pure parts: DZI geometry, window planning and the bounded caches."""

import math
import os
import xml.etree.ElementTree as ET
from fractions import Fraction

import numpy as np
import pytest

from infd_jax.view import batching, caches, dzi


@pytest.mark.parametrize("h,w", [(1, 1), (2, 2), (255, 256), (257, 300), (1000, 600),
                                 (65536, 65536), (2 ** 20, 2 ** 20), (3, 2 ** 20 - 1)])
def test_levels_are_the_image_at_ceil_of_size_over_powers_of_two(h, w):
  pyramid = dzi.Pyramid(h, w)
  levels = max(0, math.ceil(math.log2(max(h, w))))
  assert pyramid.max_level == levels
  for level in range(levels + 1):
    scale = Fraction(2) ** (levels - level)
    assert pyramid.level_hw(level) == (math.ceil(h / scale), math.ceil(w / scale))
  assert pyramid.level_hw(0) == (1, 1) and pyramid.level_hw(levels) == (h, w)
  for level in (-1, levels + 1):
    with pytest.raises(ValueError):
      pyramid.level_hw(level)


@pytest.mark.parametrize("h,w,tile,overlap", [(300, 520, 128, 1), (256, 256, 64, 0),
                                              (97, 33, 16, 3)])
def test_tiles_without_overlap_cover_each_level_once(h, w, tile, overlap):
  pyramid = dzi.Pyramid(h, w, tile_size=tile, overlap=overlap)
  for level in range(pyramid.max_level + 1):
    lh, lw = pyramid.level_hw(level)
    rows, cols = pyramid.grid(level)
    assert (rows, cols) == (math.ceil(lh / tile), math.ceil(lw / tile))
    cover = np.zeros((lh, lw), int)
    for row in range(rows):
      for col in range(cols):
        top, left, th, tw = pyramid.tile_window(level, col, row)
        assert 0 <= top and 0 <= left and top + th <= lh and left + tw <= lw
        # The overlap is on the sides that have a neighbour, and nowhere else.
        assert top == max(0, row * tile - overlap) and left == max(0, col * tile - overlap)
        assert top + th == min(lh, (row + 1) * tile + overlap)
        assert left + tw == min(lw, (col + 1) * tile + overlap)
        cover[row * tile:min(lh, (row + 1) * tile), col * tile:min(lw, (col + 1) * tile)] += 1
    assert (cover == 1).all()
    for col, row in ((cols, 0), (0, rows), (-1, 0)):
      with pytest.raises(ValueError):
        pyramid.tile_window(level, col, row)


def test_descriptor_is_deep_zoom_xml():
  image = ET.fromstring(dzi.Pyramid(600, 800, tile_size=254, overlap=1).descriptor("png"))
  assert image.tag == "{http://schemas.microsoft.com/deepzoom/2008}Image"
  assert image.attrib == {"Format": "png", "Overlap": "1", "TileSize": "254"}
  (size,) = list(image)
  assert size.tag.endswith("Size") and size.attrib == {"Width": "800", "Height": "600"}


@pytest.mark.parametrize("full_hw,region,width,expected", [
    ((1024, 1024), (0, 0, 1, 1), 512, ((512, 512), (0, 0, 512, 512))),
    ((1024, 1024), (0.25, 0.5, 0.5, 0.25), 200, ((400, 400), (200, 100, 100, 200))),
    # A view wider than the image keeps only the image's part: 1 unit = 400 px.
    ((1024, 1024), (-0.5, -0.5, 2, 2), 800, ((400, 400), (0, 0, 400, 400))),
    # A landscape image (H / W = 0.5) spans y in [0, 0.5].
    ((300, 600), (0.5, 0.25, 0.5, 0.25), 100, ((100, 200), (50, 100, 50, 100))),
])
def test_view_window_places_the_region_at_the_saved_scale(full_hw, region, width, expected):
  assert dzi.view_window(full_hw, region, width) == expected


@pytest.mark.parametrize("region", [(0, 0, 0, 1), (0, 0, 1, -1), (1.5, 0, 1, 1), (0, 2, 1, 1)])
def test_view_window_refuses_regions_off_the_image(region):
  with pytest.raises(ValueError):
    dzi.view_window((100, 100), region, 64)


def test_plan_groups_neighbouring_tiles_and_splits_scattered_ones():
  pyramid = dzi.Pyramid(4096, 4096, tile_size=256, overlap=1)
  screen = [pyramid.tile_window(12, c, r) for c in range(4, 8) for r in range(2, 5)]
  (box, members), = batching.plan(screen, max_pixels=1 << 22)
  assert sorted(members) == list(range(len(screen)))
  assert box == (511, 1023, 770, 1026)  # rows 511..1280, columns 1023..2048
  rng = np.random.default_rng(0)
  scattered = [(int(t), int(l), 100, 100) for t, l in rng.integers(0, 4000, (40, 2))]
  groups = batching.plan(scattered, max_pixels=1 << 16, max_waste=2.0)
  assert sorted(i for _, members in groups for i in members) == list(range(40))
  for (top, left, h, w), members in groups:
    inside = [scattered[i] for i in members]
    assert all(top <= t and left <= l and t + a <= top + h and l + b <= left + w
               for t, l, a, b in inside)
    if len(members) > 1:
      assert h * w <= 1 << 16 and h * w <= 2 * sum(a * b for _, _, a, b in inside)


def test_lru_keeps_the_most_recently_used_within_its_capacity():
  lru = caches.LRU(10, cost=len)
  for key in "abc":
    lru.put(key, key * 4)  # cost 4 each: c evicts a
  assert (lru.get("a"), lru.get("b"), lru.total) == (None, "bbbb", 8)
  lru.put("d", "dddd")  # b was read after c was written: c goes
  assert (lru.get("c"), lru.get("b"), lru.get("d")) == (None, "bbbb", "dddd")
  assert lru.get_or_make("e", lambda: "e" * 11) == "e" * 11  # larger than all: not kept
  assert lru.get("e") is None and lru.total == 8
  made = []
  assert lru.get_or_make("b", lambda: made.append(1)) == "bbbb" and not made


def test_disk_cache_stays_within_its_bytes_and_survives_a_restart(tmp_path):
  cache = caches.DiskCache(tmp_path, max_bytes=250)
  for i in range(5):
    cache.put(f"s/{i}.png", bytes([i]) * 100)
    os.utime(tmp_path / "s" / f"{i}.png", (1000 + i, 1000 + i))  # distinct recency on disk
  assert cache.total_bytes == 200 and cache.get("s/0.png") is None
  assert cache.get("s/3.png") == bytes([3]) * 100  # read: now the most recent
  (tmp_path / "s" / ".part-x").write_bytes(b"cut short")
  again = caches.DiskCache(tmp_path, max_bytes=150)  # restart with a smaller bound
  assert again.total_bytes == 100 and again.get("s/3.png") == bytes([3]) * 100
  assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["3.png"]
  again.put("big", b"x" * 151)  # larger than the bound: not stored
  assert again.get("big") is None and again.total_bytes == 100


def test_cache_keys_never_leave_the_cache_folder():
  key = caches.key_path("fp", "..", "a/b", "ok-1.png", 7)
  parts = key.split("/")
  assert len(parts) == 5 and parts[0] == "fp" and parts[3:] == ["ok-1.png", "7"]
  assert ".." not in parts and all("/" not in p for p in parts)
