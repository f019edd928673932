"""Metric collections (clu) on sharded batches, PSNR, codebook usage, scale consistency."""

from absl.testing import absltest
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from infd_jax.evaluation import metrics
from infd_jax.evaluation import scale_consistency

_AE_SCALARS = ("loss", "quant_loss", "l1_loss", "perc_loss", "gan_g_loss", "adaptive_g_w",
               "disc_loss", "disc_logits_real", "disc_logits_fake", "codebook_perplexity",
               "codebook_usage")


def _ae_outputs(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
  out = {k: np.float32(rng.normal()) for k in _AE_SCALARS}
  out["psnr"] = rng.uniform(10, 30, batch).astype(np.float32)   # per example
  return out


class PsnrTest(absltest.TestCase):

  def test_closed_form(self):
    gt = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (3, 4, 5, 3)), jnp.float32)
    # pred = gt + 2c gives mean(((gt - pred) / 2)^2) = c^2, so PSNR = -20 log10(c).
    c = jnp.asarray([0.1, 0.01, 0.0])[:, None, None, None]
    got = metrics.psnr(gt + 2 * c, gt)
    np.testing.assert_allclose(got[:2], [20.0, 40.0], rtol=1e-4)
    self.assertEqual(got[2], jnp.inf)
    self.assertEqual(got.shape, (3,))


class CodebookUsageTest(absltest.TestCase):

  def test_histogram_statistics(self):
    f = jax.jit(metrics.codebook_usage, static_argnums=1)
    uniform4 = f(jnp.asarray([[0, 1], [2, 3]] * 3), 8)
    self.assertAlmostEqual(float(uniform4["perplexity"]), 4.0, places=5)
    self.assertAlmostEqual(float(uniform4["fraction_used"]), 0.5)
    one = f(jnp.full((2, 3, 3), 5), 8)
    self.assertAlmostEqual(float(one["perplexity"]), 1.0, places=6)
    self.assertAlmostEqual(float(one["fraction_used"]), 1 / 8)
    # p = (1/2, 1/4, 1/4): entropy 1.5 bits, perplexity 2^1.5.
    skew = f(jnp.asarray([7, 7, 1, 2]), 16)
    self.assertAlmostEqual(float(skew["perplexity"]), 2 ** 1.5, places=5)
    self.assertAlmostEqual(float(skew["fraction_used"]), 3 / 16)


class CollectionTest(absltest.TestCase):

  def test_sharded_batch_gives_global_values(self):
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    self.assertEqual(mesh.size, 8)
    out = _ae_outputs(np.random.default_rng(0), 16)
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P("data") if np.ndim(v) else P()))
               for k, v in out.items()}
    self.assertLen(sharded["psnr"].sharding.device_set, 8)
    make = jax.jit(lambda o: metrics.AETrainMetrics.single_from_model_output(**o))
    got = make(sharded).compute()
    whole = metrics.AETrainMetrics.single_from_model_output(**out).compute()
    self.assertCountEqual(got, (*_AE_SCALARS, "psnr"))
    for k in got:
      np.testing.assert_allclose(got[k], whole[k], rtol=1e-6)
    np.testing.assert_allclose(got["psnr"], out["psnr"].mean(), rtol=1e-6)

  def test_merge_weights_by_counts(self):
    rng = np.random.default_rng(1)
    steps = [_ae_outputs(rng, 4), _ae_outputs(rng, 2), _ae_outputs(rng, 2)]
    acc = metrics.AETrainMetrics.empty()
    for o in steps:
      acc = acc.merge(metrics.AETrainMetrics.single_from_model_output(**o))
    got = acc.compute()
    # Per-example values weigh by examples (8 in all), scalars once per step.
    np.testing.assert_allclose(got["psnr"], np.concatenate([o["psnr"] for o in steps]).mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(got["loss"], np.mean([o["loss"] for o in steps]), rtol=1e-6)

  def test_dm_collections(self):
    train = metrics.DMTrainMetrics.single_from_model_output(z_dm_loss=0.5, grad_norm=2.0)
    train = train.merge(metrics.DMTrainMetrics.single_from_model_output(z_dm_loss=0.25,
                                                                       grad_norm=1.0))
    np.testing.assert_allclose(train.compute()["z_dm_loss"], 0.375)
    ev = metrics.DMEvalMetrics.single_from_model_output(z_dm_loss=1.0, z_dm_ema_loss=0.75)
    self.assertEqual(set(ev.compute()), {"z_dm_loss", "z_dm_ema_loss"})
    self.assertIn("psnr", metrics.AEEvalMetrics.empty().compute())


def _box(img: jax.Array, size: int) -> jax.Array:
  b, h, _, c = img.shape
  f = h // size
  return img.reshape(b, size, f, size, f, c).mean(axis=(2, 4))


class ScaleConsistencyTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.hi = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)

  def test_consistent_renderer_is_perfect_and_point_sampling_is_not(self):
    # Each pixel is the average of the fixed image over its cell, so rendering
    # at k*s and box-averaging k x k blocks reproduces the s rendering.
    consistent = lambda s: _box(self.hi, s)
    l1 = lambda x, y: jnp.mean(jnp.abs(x - y), axis=(1, 2, 3))
    got = scale_consistency.scale_consistency(consistent, 8, lpips_fn=l1)
    self.assertEqual(set(got), {"scale_psnr_x2", "scale_psnr_x4", "scale_lpips_x2",
                                "scale_lpips_x4"})
    self.assertGreater(got["scale_psnr_x2"], 100.0)
    self.assertGreater(got["scale_psnr_x4"], 100.0)
    self.assertLess(got["scale_lpips_x4"], 1e-6)
    # Point sampling (one sample at each cell's corner) aliases across scales.
    pointwise = lambda s: self.hi[:, ::64 // s, ::64 // s]
    bad = scale_consistency.scale_consistency(pointwise, 8)
    self.assertLess(bad["scale_psnr_x2"], 20.0)
    self.assertLess(bad["scale_psnr_x4"], 20.0)

  def test_resize_filters_keep_constants(self):
    flat = jnp.full((1, 16, 16, 3), 0.25)
    for method in ("box", "lanczos3", "linear"):
      down = scale_consistency.downsample(flat, 4, method)
      self.assertEqual(down.shape, (1, 4, 4, 3))
      np.testing.assert_allclose(down, 0.25, atol=1e-6)
    with self.assertRaises(ValueError):
      scale_consistency.downsample(flat, 3)


if __name__ == "__main__":
  absltest.main()
