"""Coordinate grids, the renderer's nearest-feature lookup, the CLIF renderer and official tiling."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from infd_jax.rendering import coords, tiles, tiling
from infd_jax.models import renderer as renderer_lib
from infd_jax.models.renderer import CLIFRenderer

_FEAT_C = 8
_TILE, _PAD = 16, 4


def _tile_dependent_render(params, phi, coord, cell):
  """A cheap stand-in network whose output depends on the whole tile (like GroupNorm)."""
  del params
  x = renderer_lib.renderer_input(phi, coord, cell)[..., :3]
  return x - 0.5 * x.mean(axis=(1, 2), keepdims=True)


class CoordsTest(absltest.TestCase):

  def test_grid_is_ieee_exact(self):
    # The float32 value of the official (0.5 + i) / s, correctly rounded; the
    # tie rule of the lookup depends on the last bit.
    axis = coords.axis_centers(1000)
    want = [np.float32(-1) + np.float32(2) * (np.float32(0.5 + i) / np.float32(1000))
            for i in range(1000)]
    np.testing.assert_array_equal(axis, want)

  def test_grid_is_pixel_centres_row_major(self):
    coord, cell = coords.make_coord_cell_grid((3, 5), batch=2)
    self.assertEqual(coord.shape, (2, 3, 5, 2))
    rows = -1 + (2 * np.arange(3) + 1) / 3
    cols = -1 + (2 * np.arange(5) + 1) / 5
    np.testing.assert_allclose(coord[1, :, 0, 0], rows, rtol=0, atol=1e-7)
    np.testing.assert_allclose(coord[1, 0, :, 1], cols, rtol=0, atol=1e-7)
    np.testing.assert_allclose(cell[0, 2, 4], [2 / 3, 2 / 5], rtol=1e-7)

  def test_grid_per_axis_range(self):
    coord, cell = coords.make_coord_cell_grid((2, 4), ranges=((0.0, 1.0), (-1.0, 0.0)))
    np.testing.assert_allclose(coord[:, 0, 0], [0.25, 0.75])
    np.testing.assert_allclose(coord[0, :, 1], [-0.875, -0.625, -0.375, -0.125])
    np.testing.assert_allclose(cell[0, 0], [0.5, 0.25])

  def test_window_equals_crop_of_full_grid_bitwise(self):
    full_c, full_ce = coords.make_coord_cell_grid((1000, 384))
    c, ce = coords.window_coord_cell((1000, 384), (371, 17), (9, 13))
    np.testing.assert_array_equal(c, full_c[371:380, 17:30])
    np.testing.assert_array_equal(ce, full_ce[371:380, 17:30])

  def test_float64_grid_is_the_official_float64_formula(self):
    # In float64 (x64 steps) the same operation order, rounded in float64.
    coord, cell = coords.window_coord_cell((1000, 384), (371, 17), (9, 13), dtype=np.float64)
    rows = [-1.0 + 2.0 * ((0.5 + i) / 1000) for i in range(371, 380)]
    cols = [-1.0 + 2.0 * ((0.5 + j) / 384) for j in range(17, 30)]
    self.assertEqual((coord.dtype, cell.dtype), (np.float64, np.float64))
    np.testing.assert_array_equal(coord[:, 0, 0], rows)
    np.testing.assert_array_equal(coord[0, :, 1], cols)
    np.testing.assert_array_equal(cell[0, 0], [2 / 1000, 2 / 384])
    np.testing.assert_array_equal(coord, coords.make_coord_cell_grid(
        (1000, 384), dtype=np.float64)[0][371:380, 17:30])

  def test_nearest_index_ties_round_half_to_even(self):
    k = renderer_lib.nearest_index(jnp.asarray([-0.5, 0.0, 0.5, -0.99, 0.99]), 4)
    np.testing.assert_array_equal(k, [0, 2, 2, 0, 3])

  def test_lookup_matches_formulas(self):
    hf, wf, c = 4, 6, 3
    # Each feature vector encodes its own (row, col) so the gather is checkable.
    rr, cc = np.meshgrid(np.arange(hf), np.arange(wf), indexing="ij")
    feat = np.stack([rr, cc, 10 * rr + cc], -1).astype(np.float32)[None]
    coord = np.array([[[[-0.9, -0.95], [0.0, 0.2]], [[0.3, 0.99], [-0.26, 1.5]]]], np.float32)
    cell = np.full_like(coord, 0.125)
    q_feat, rel_coord, rel_cell = renderer_lib.lookup_nearest(jnp.asarray(feat), coord, cell)
    for i in range(2):
      for j in range(2):
        y, x = coord[0, i, j]
        kr, kc = np.round(((y + 1) * hf - 1) / 2), np.round(((x + 1) * wf - 1) / 2)
        if not (0 <= kc < wf):  # outside the map: zero feature and zero centre
          np.testing.assert_array_equal(q_feat[0, i, j], 0)
          np.testing.assert_allclose(rel_coord[0, i, j], [y * hf, x * wf], rtol=1e-6)
          continue
        np.testing.assert_array_equal(q_feat[0, i, j], [kr, kc, 10 * kr + kc])
        centre = (-1 + (2 * kr + 1) / hf, -1 + (2 * kc + 1) / wf)
        np.testing.assert_allclose(rel_coord[0, i, j], [(y - centre[0]) * hf, (x - centre[1]) * wf],
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rel_cell[0, 0, 0], [0.125 * hf, 0.125 * wf])
    inp = renderer_lib.renderer_input(jnp.asarray(feat), coord, cell)
    self.assertEqual(inp.shape, (1, 2, 2, c + 4))
    np.testing.assert_array_equal(inp[..., c:c + 2], rel_coord)
    np.testing.assert_array_equal(inp[..., c + 2:], rel_cell)

  def test_rel_coord_within_unit_cell_for_pixel_grids(self):
    coord, cell = coords.make_coord_cell_grid((24, 10), batch=1)
    _, rel_coord, rel_cell = renderer_lib.lookup_nearest(jnp.zeros((1, 8, 8, 1)), coord, cell)
    self.assertLessEqual(float(jnp.max(jnp.abs(rel_coord))), 1.0)
    np.testing.assert_allclose(rel_cell[0, 0, 0], [8 / 24 * 2, 8 / 10 * 2], rtol=1e-6)


class OfficialTilesTest(absltest.TestCase):

  def test_tile_shapes_at_1024(self):
    shapes = [t.in_hw for t in tiles.official_tiles((1024, 1024))]
    self.assertLen(shapes, 16)
    self.assertEqual(shapes.count((272, 272)), 4)
    self.assertEqual(shapes.count((264, 272)) + shapes.count((272, 264)), 8)
    self.assertEqual(shapes.count((264, 264)), 4)
    self.assertEqual({t.in_hw for t in tiles.official_tiles((512, 512))}, {(264, 264)})
    self.assertEqual(list(tiles.official_tiles((256, 256))),
                     [tiles.Tile((0, 0), (256, 256), (0, 0), (256, 256))])

  def test_window_tiles_are_those_of_the_image_that_meet_it(self):
    out_hw, tile, pad = (1000, 700), 256, 8
    every = list(tiles.official_tiles(out_hw, tile, pad))
    for window in ((0, 0, 1000, 700), (255, 511, 2, 2), (256, 512, 1, 188), (700, 3, 300, 50)):
      top, left, h, w = window
      meets = [t for t in every
               if t.out_origin[0] < top + h and top < t.out_origin[0] + t.out_hw[0]
               and t.out_origin[1] < left + w and left < t.out_origin[1] + t.out_hw[1]]
      self.assertEqual(list(tiles.official_tiles(out_hw, tile, pad, window)), meets)

  def test_a_window_of_a_2_20_image_creates_only_its_own_tiles(self):
    side, window = 2 ** 20, (2 ** 19 - 24, 2 ** 19 - 40, 64, 80)  # across 2 x 2 tiles
    created, tile_record = [], tiles.Tile

    def counted(**fields):
      created.append(tile_record(**fields))
      return created[-1]

    phi = jax.random.normal(jax.random.key(3), (1, 16, 16, 4))
    renderer = tiling.TiledRenderer(_tile_dependent_render, tile=256, pad=8, tiles_per_call=4)
    with mock.patch.object(tiles, "Tile", counted):
      got = renderer.render_image(None, phi, (side, side), window)
    self.assertLen(created, 4)
    # Reference: the official loop's rule for these four interior tiles: render the
    # 272 x 272 padded tile in one call, keep its 256 x 256 centre.
    want = np.zeros((1, side // 2 ** 11, side // 2 ** 11, 3), np.float32)  # rows/cols 2^19 +- 256
    base = 2 ** 19 - 256
    for x0 in (base, base + 256):
      for y0 in (base, base + 256):
        coord, cell = coords.window_coord_cell((side, side), (x0 - 8, y0 - 8), (272, 272))
        out = np.asarray(_tile_dependent_render(None, phi, coord[None], cell[None]))
        want[:, x0 - base:x0 - base + 256, y0 - base:y0 - base + 256] = out[:, 8:264, 8:264]
    top, left = window[0] - base, window[1] - base
    np.testing.assert_array_equal(got, want[:, top:top + 64, left:left + 80])


def _official_loop(render_fn, params, phi, out_hw, tile, pad):
  """Straight port of the official patchwise loop (REFERENCE.md 7, step 3), one call per tile."""
  res_h, res_w = out_hw
  coord, cell = coords.make_coord_cell_grid(out_hw, batch=phi.shape[0])
  out = np.zeros((phi.shape[0], res_h, res_w, 3), np.float32)
  for x0 in range(0, res_h, tile):
    for y0 in range(0, res_w, tile):
      xl, yl = min(tile, res_h - x0), min(tile, res_w - y0)
      xpl, xpr = min(pad, x0), min(pad, res_h - (x0 + xl))
      ypl, ypr = min(pad, y0), min(pad, res_w - (y0 + yl))
      sl = (slice(None), slice(x0 - xpl, x0 + xl + xpr), slice(y0 - ypl, y0 + yl + ypr))
      pred = np.asarray(jax.jit(render_fn)(params, phi, coord[sl], cell[sl]))
      out[:, x0:x0 + xl, y0:y0 + yl] = pred[:, xpl:xpl + xl, ypl:ypl + yl]
  return out


class TiledRenderTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = CLIFRenderer(feat_channels=_FEAT_C, hidden=32)
    cls.phi = jax.random.normal(jax.random.key(0), (2, 6, 5, _FEAT_C))
    c, ce = coords.make_coord_cell_grid((4, 4), batch=2)
    cls.params = jax.jit(cls.model.init)(jax.random.key(1), cls.phi, c, ce)
    cls.renderer = tiling.TiledRenderer(tiling.module_render_fn(cls.model), _TILE, _PAD,
                                        tiles_per_call=2)
    # Non-square with interior, edge, corner and short last tiles on both axes.
    cls.out_hw = (56, 27)
    cls.full = cls.renderer.render_image(cls.params, cls.phi, cls.out_hw)

  def test_shape_and_official_loop(self):
    self.assertEqual(self.full.shape, (2, *self.out_hw, 3))
    want = _official_loop(self.renderer.render_fn, self.params, self.phi, self.out_hw, _TILE, _PAD)
    np.testing.assert_allclose(self.full, want, rtol=1e-5, atol=1e-5)

  def test_tiles_keep_groupnorm_per_tile(self):
    c, ce = coords.make_coord_cell_grid(self.out_hw, batch=2)
    whole = np.asarray(self.renderer.render_grid(self.params, self.phi, c, ce))
    # Same net, different GroupNorm statistics: tiling must not be a no-op.
    self.assertGreater(np.max(np.abs(whole - self.full)), 1e-3)

  def test_single_tile_equals_untiled(self):
    out_hw = (_TILE, 12)
    c, ce = coords.make_coord_cell_grid(out_hw, batch=2)
    whole = self.renderer.render_grid(self.params, self.phi, c, ce)
    tiled = self.renderer.render_image(self.params, self.phi, out_hw)
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5)

  def test_window_equals_crop_of_tiled_image(self):
    window = (10, 5, 30, 17)
    got = self.renderer.render_image(self.params, self.phi, self.out_hw, window)
    np.testing.assert_allclose(got, self.full[:, 10:40, 5:22], rtol=1e-5, atol=1e-5)
    with self.assertRaises(ValueError):
      self.renderer.render_image(self.params, self.phi, self.out_hw, (50, 0, 10, 5))

  def test_without_groupnorm_tiles_equal_one_pass(self):
    # normalize=False (the official switch) leaves a 13 x 13 receptive field and
    # nothing grid-wide: with context >= its radius 6 the tiles add up to one
    # pass; with less context the zero padding shows at the tile borders.
    model = CLIFRenderer(feat_channels=_FEAT_C, hidden=32, normalize=False)
    params = model.init(jax.random.key(1), self.phi, *coords.make_coord_cell_grid((4, 4), batch=2))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    self.assertTrue([p for p in paths if "['conv_out']['kernel']" in p])
    self.assertEqual([p for p in paths if "norm" in p], [])
    c, ce = coords.make_coord_cell_grid(self.out_hw, batch=2)
    whole = np.asarray(jax.jit(model.apply)(params, self.phi, c, ce))
    for pad, same in ((6, True), (5, False)):
      tiled = tiling.TiledRenderer(tiling.module_render_fn(model), _TILE, pad, 2).render_image(
          params, self.phi, self.out_hw)
      if same:
        np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5)
      else:
        self.assertGreater(np.max(np.abs(tiled - whole)), 1e-4)

  def test_window_grid_is_global_crop(self):
    # A pointwise render_fn has no dependence on the grid extent, so a
    # single-call window must equal the crop of the single-call full render.
    def pointwise(params, phi, coord, cell):
      del params
      return renderer_lib.renderer_input(phi, coord, cell)[..., :3] + renderer_lib.renderer_input(
          phi, coord, cell)[..., -3:]
    coord, cell = coords.make_coord_cell_grid((40, 30), batch=2)
    full = pointwise(None, self.phi, coord, cell)
    got = pointwise(None, self.phi, *tiling.window_grid((40, 30), (7, 11, 9, 13), 2))
    np.testing.assert_array_equal(got, full[:, 7:16, 11:24])


if __name__ == "__main__":
  absltest.main()
