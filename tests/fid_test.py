"""FID math, streaming statistics, the FID InceptionV3 port and the patch-FID protocol."""

import collections
import shutil
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from infd_jax.evaluation import fid
from infd_jax.evaluation import inception
from infd_jax.evaluation import pfid
from tests import torch_zip_writer


def _tempdir(test: absltest.TestCase) -> str:
  # absltest's create_tempdir needs parsed absl flags, which pytest never parses.
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


def _rotation(d: int, seed: int) -> np.ndarray:
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return q


class FrechetDistanceTest(absltest.TestCase):

  def test_identical_gaussians_give_zero(self):
    x = np.random.default_rng(0).normal(size=(200, 16))
    mu, s = np.mean(x, 0), np.cov(x, rowvar=False)
    self.assertAlmostEqual(fid.frechet_distance(mu, s, mu, s), 0.0, places=9)

  def test_commuting_covariances_closed_form(self):
    # Same eigenbasis Q: d^2 = |dmu|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    d = 12
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    q = _rotation(d, 2)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    self.assertAlmostEqual(got, want, places=9)

  def test_rank_deficient_covariances(self):
    # Half the variances are exactly 0 on each side, in a rotated basis, so
    # S1 @ S2 is singular and non-symmetric in floating point.
    d = 64
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    a[::2] = 0.0
    b[:d // 2] = 0.0
    q = _rotation(d, 4)
    want = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(np.zeros(d), (q * a) @ q.T, np.zeros(d), (q * b) @ q.T)
    self.assertAlmostEqual(got, want, places=8)

  def test_few_samples_in_high_dimension_matches_factor_form(self):
    # 20 samples in 100-d: covariances of rank 19. With S1 = F F^T, S2 = G G^T,
    # tr((S1 S2)^(1/2)) is the nuclear norm of F^T G: an independent reference.
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(20, 100)), rng.normal(size=(20, 100)) * 1.5 + 0.3
    f = (x - x.mean(0)).T / np.sqrt(len(x) - 1)
    g = (y - y.mean(0)).T / np.sqrt(len(y) - 1)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    nuclear = np.linalg.svd(f.T @ g, compute_uv=False).sum()
    want = (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear)
    got = fid.frechet_distance(x.mean(0), s1, y.mean(0), s2)
    self.assertAlmostEqual(got, want, delta=1e-9 * want)
    self.assertAlmostEqual(fid.frechet_distance(x.mean(0), s1, x.mean(0), s1), 0.0, places=9)


class FeatureStatsTest(absltest.TestCase):

  def test_streaming_equals_batch_with_np_cov_ddof1(self):
    rng = np.random.default_rng(0)
    # A large common offset: the raw sum-of-outer-products formula loses
    # digits here, the pairwise merge does not.
    x = (rng.normal(size=(103, 7)) * 0.01 + 1e4).astype(np.float32).astype(np.float64)
    stats = fid.FeatureStats.empty(7)
    for chunk in np.array_split(x, [10, 11, 50, 50]):    # includes an empty batch
      stats = stats.update(chunk)
    mu, cov = stats.mean_cov()
    self.assertEqual(stats.count, 103)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-6, atol=1e-12)

  def test_merge_is_union_and_round_trips_through_npz(self):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(12, 5)) + 2
    merged = fid.FeatureStats.from_features(x).merge(fid.FeatureStats.from_features(y))
    whole = np.concatenate([x, y])
    np.testing.assert_allclose(merged.mean_cov()[1], np.cov(whole, rowvar=False), atol=1e-12)
    path = _tempdir(self) + "/s.npz"
    merged.save(path)
    loaded = fid.FeatureStats.load(path)
    self.assertEqual(loaded.count, 42)
    np.testing.assert_array_equal(loaded.scatter, merged.scatter)
    self.assertAlmostEqual(fid.fid_from_stats(merged, loaded), 0.0, places=9)


def _torch_fid_inception_layers() -> list[tuple[str, int, int, int, int]]:
  """(name, in, out, kh, kw) of each BasicConv2d of pytorch-fid's FIDInceptionV3.

  Written from the torchvision Inception3 / pytorch-fid layer list, independently
  of the Flax module, so that names, shapes and counts are cross-checked.
  """
  layers = []

  def bc(name, cin, cout, kh, kw=None):
    layers.append((name, cin, cout, kh, kh if kw is None else kw))

  bc("Conv2d_1a_3x3", 3, 32, 3)
  bc("Conv2d_2a_3x3", 32, 32, 3)
  bc("Conv2d_2b_3x3", 32, 64, 3)
  bc("Conv2d_3b_1x1", 64, 80, 1)
  bc("Conv2d_4a_3x3", 80, 192, 3)
  for m, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
    bc(f"{m}.branch1x1", cin, 64, 1)
    bc(f"{m}.branch5x5_1", cin, 48, 1)
    bc(f"{m}.branch5x5_2", 48, 64, 5)
    bc(f"{m}.branch3x3dbl_1", cin, 64, 1)
    bc(f"{m}.branch3x3dbl_2", 64, 96, 3)
    bc(f"{m}.branch3x3dbl_3", 96, 96, 3)
    bc(f"{m}.branch_pool", cin, pool, 1)
  bc("Mixed_6a.branch3x3", 288, 384, 3)
  bc("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
  bc("Mixed_6a.branch3x3dbl_2", 64, 96, 3)
  bc("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
  for m, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    bc(f"{m}.branch1x1", 768, 192, 1)
    bc(f"{m}.branch7x7_1", 768, c7, 1)
    bc(f"{m}.branch7x7_2", c7, c7, 1, 7)
    bc(f"{m}.branch7x7_3", c7, 192, 7, 1)
    bc(f"{m}.branch7x7dbl_1", 768, c7, 1)
    bc(f"{m}.branch7x7dbl_2", c7, c7, 7, 1)
    bc(f"{m}.branch7x7dbl_3", c7, c7, 1, 7)
    bc(f"{m}.branch7x7dbl_4", c7, c7, 7, 1)
    bc(f"{m}.branch7x7dbl_5", c7, 192, 1, 7)
    bc(f"{m}.branch_pool", 768, 192, 1)
  bc("Mixed_7a.branch3x3_1", 768, 192, 1)
  bc("Mixed_7a.branch3x3_2", 192, 320, 3)
  bc("Mixed_7a.branch7x7x3_1", 768, 192, 1)
  bc("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
  bc("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1)
  bc("Mixed_7a.branch7x7x3_4", 192, 192, 3)
  for m, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
    bc(f"{m}.branch1x1", cin, 320, 1)
    bc(f"{m}.branch3x3_1", cin, 384, 1)
    bc(f"{m}.branch3x3_2a", 384, 384, 1, 3)
    bc(f"{m}.branch3x3_2b", 384, 384, 3, 1)
    bc(f"{m}.branch3x3dbl_1", cin, 448, 1)
    bc(f"{m}.branch3x3dbl_2", 448, 384, 3)
    bc(f"{m}.branch3x3dbl_3a", 384, 384, 1, 3)
    bc(f"{m}.branch3x3dbl_3b", 384, 384, 3, 1)
    bc(f"{m}.branch_pool", cin, 192, 1)
  return layers


def _fake_torch_state_dict(seed: int = 0) -> collections.OrderedDict:
  rng = np.random.default_rng(seed)
  sd = collections.OrderedDict()
  for name, cin, cout, kh, kw in _torch_fid_inception_layers():
    sd[f"{name}.conv.weight"] = rng.normal(size=(cout, cin, kh, kw)).astype(np.float32)
    sd[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    sd[f"{name}.bn.bias"] = rng.normal(size=cout).astype(np.float32)
    sd[f"{name}.bn.running_mean"] = rng.normal(size=cout).astype(np.float32)
    sd[f"{name}.bn.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    sd[f"{name}.bn.num_batches_tracked"] = np.array(0, np.int64)
  sd["fc.weight"] = rng.normal(size=(1008, 2048)).astype(np.float32)
  sd["fc.bias"] = rng.normal(size=1008).astype(np.float32)
  return sd


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


class InceptionTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.abstract = inception.abstract_variables()
    cls.sd = _fake_torch_state_dict()

  def test_parameter_count(self):
    # torchvision's inception_v3 has 27,161,264 parameters; without the aux head
    # (3,326,696) and its 1000-way fc (2,049,000) the convs + BN affine remain.
    convs_and_bn = 27_161_264 - 3_326_696 - 2_049_000
    self.assertEqual(convs_and_bn, 21_785_568)
    self.assertEqual(_count(self.abstract["params"]), convs_and_bn)
    spec = _torch_fid_inception_layers()
    self.assertEqual(sum(o * i * kh * kw + 2 * o for _, i, o, kh, kw in spec), convs_and_bn)
    bn_channels = sum(o for _, _, o, _, _ in spec)
    self.assertEqual(_count(self.abstract["batch_stats"]), 2 * bn_channels)
    # Everything in pytorch-fid's file (running stats and the 1008-way fc included).
    fc = 2048 * 1008 + 1008
    self.assertEqual(convs_and_bn + 2 * bn_channels + fc, 23_885_392)

  def test_forward_shapes(self):
    model = inception.FIDInceptionV3()
    out = jax.eval_shape(model.apply, self.abstract,
                         jax.ShapeDtypeStruct((2, 64, 48, 3), jnp.uint8))
    self.assertEqual(out.shape, (2, inception.FEATURE_DIM))
    self.assertEqual(out.dtype, jnp.float32)

  def test_convert_cli_save_and_load(self):
    tmp = _tempdir(self)
    pth, npz = f"{tmp}/pt_inception.pth", f"{tmp}/inception_fid.npz"
    torch_zip_writer.save(self.sd, pth)
    inception.main(["--convert", f"--input={pth}", f"--output={npz}"])
    v = inception.load_inception_params(npz)
    conv = v["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    self.assertEqual(conv.shape, (1, 7, 128, 128))
    np.testing.assert_array_equal(
        conv, self.sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    bn = v["params"]["Mixed_7c"]["branch_pool"]["bn"]
    np.testing.assert_array_equal(bn["scale"], self.sd["Mixed_7c.branch_pool.bn.weight"])
    np.testing.assert_array_equal(bn["bias"], self.sd["Mixed_7c.branch_pool.bn.bias"])
    stats = v["batch_stats"]["Conv2d_1a_3x3"]["bn"]
    np.testing.assert_array_equal(stats["mean"], self.sd["Conv2d_1a_3x3.bn.running_mean"])
    np.testing.assert_array_equal(stats["var"], self.sd["Conv2d_1a_3x3.bn.running_var"])
    self.assertEqual(jax.tree.structure(v), jax.tree.structure(self.abstract))

  def test_conversion_errors(self):
    sd = dict(self.sd)
    del sd["Mixed_5b.branch_pool.bn.running_var"]
    with self.assertRaisesRegex(KeyError, "Mixed_5b.branch_pool.bn.running_var"):
      inception.inception_params_from_torch_state_dict(sd)
    with self.assertRaisesRegex(ValueError, "AuxLogits"):
      inception.inception_params_from_torch_state_dict(
          {**self.sd, "AuxLogits.fc.weight": np.zeros((1, 1))})
    with self.assertRaisesRegex(FileNotFoundError, "missing_weights.npz"):
      inception.load_inception_params("/nonexistent/missing_weights.npz")

  def test_tf1_resize_and_pool_match_their_definitions(self):
    # TF1 align_corners=False: source = dst * in/out, upper neighbour clamped.
    x = jnp.asarray([10.0, 20.0]).reshape(1, 2, 1, 1) * jnp.ones((1, 1, 2, 1))
    y = inception.resize_like_tf1(x, 4)[0, :, 0, 0]
    np.testing.assert_allclose(y, [10.0, 15.0, 20.0, 20.0])
    z = jnp.arange(2 * 7 * 5 * 3, dtype=jnp.float32).reshape(2, 7, 5, 3)
    zr = jax.jit(inception.resize_like_tf1, static_argnums=1)
    np.testing.assert_allclose(zr(z[:, :5], 5), z[:, :5], rtol=1e-6)   # identity
    # Average pools ignore padding (TF): a constant map stays constant at borders.
    np.testing.assert_allclose(inception._avg_pool_3x3(jnp.ones((1, 4, 4, 2))), 1.0)


def _images(n: int, size: int, seed: int) -> list[np.ndarray]:
  """Smooth random colour fields (so the crops' features vary)."""
  rng = np.random.default_rng(seed)
  t = np.linspace(0, 1, size)
  out = []
  for _ in range(n):
    f = rng.uniform(1, 4, (3, 2))
    ph = rng.uniform(0, 2 * np.pi, 3)
    img = np.stack([np.sin(2 * np.pi * (f[c, 0] * t[:, None] + f[c, 1] * t[None]) + ph[c])
                    for c in range(3)], -1)
    out.append(np.round((img * 0.5 + 0.5) * 255).astype(np.uint8))
  return out


class PatchFIDTest(absltest.TestCase):

  def test_vgg_fallback_is_zero_on_itself_and_grows_with_noise(self):
    ext = pfid.make_feature_extractor(None, batch_size=8)
    self.assertEqual(ext.name, "pfd_vgg16")
    real = _images(16, 32, 0)
    rng = np.random.default_rng(9)
    real_stats = pfid.patch_stats(real, (32, 16), ext, np.random.default_rng(1))
    self.assertEqual(real_stats[32].count, 16)

    def noisy(sigma):
      return [np.clip(im + rng.normal(0, sigma, im.shape), 0, 255).astype(np.uint8)
              for im in real]

    # The full public entry point: 32-crops of 32-px images are the whole image.
    scores = pfid.patch_fid(real, list(real), ext, patch_sizes=(32,), seed=3)
    self.assertEqual(list(scores), ["pfd_vgg16_32_32"])
    self.assertLess(abs(scores["pfd_vgg16_32_32"]), 1e-6)
    d = {}
    for sigma in (8.0, 40.0):
      fake_stats = pfid.patch_stats(noisy(sigma), (32, 16), ext, np.random.default_rng(2))
      d[sigma] = {p: fid.fid_from_stats(real_stats[p], fake_stats[p]) for p in (32, 16)}
    for p in (32, 16):
      self.assertGreater(d[8.0][p], 1e-3)
      self.assertGreater(d[40.0][p], 2 * d[8.0][p])

  def test_crop_and_folder_reader(self):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    tmp = _tempdir(self)
    imgs = _images(3, 20, 4)
    for i, im in enumerate(imgs):
      Image.fromarray(im).save(f"{tmp}/{i:02d}.png")
    read = list(pfid.iter_image_folder(tmp, num_threads=2))
    for a, b in zip(read, imgs):
      np.testing.assert_array_equal(a, b)
    # Pixel (y, x) holds (y, x, 0), so a crop's first pixel is its corner.
    yy, xx = np.meshgrid(np.arange(20), np.arange(20), indexing="ij")
    yx = np.stack([yy, xx, np.zeros_like(yy)], -1)
    rng = np.random.default_rng(0)
    corners = set()
    for _ in range(200):
      c = pfid.random_crop(yx.astype(np.uint8), 18, rng)
      self.assertEqual(c.shape, (18, 18, 3))
      corners.add(tuple(c[0, 0, :2]))
    self.assertEqual(corners, {(y, x) for y in range(3) for x in range(3)})
    with self.assertRaises(ValueError):
      pfid.random_crop(imgs[0], 21, rng)


if __name__ == "__main__":
  absltest.main()
