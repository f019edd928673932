"""Tests for the diffusion schedule, forward process, loss and DDIM sampler."""

import functools
import math

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from infd_jax.diffusion import gaussian
from infd_jax.diffusion import samplers
from infd_jax.diffusion import schedules


def _fake_eps(params, x, t):
  """A deterministic stand-in for the UNet that depends on x and on t."""
  return params * x + t.astype(jnp.float32)[:, None, None, None] / 1000.0


def _ddim_reference(x_init, noises, timesteps, eta):
  """Independent float64 numpy DDIM (REFERENCE.md 6.3) for `_fake_eps` with params 0.1.

  Returns the final x, every x after each step and every predicted x0.
  """
  betas = np.linspace(0.0015, 0.0195, 1000)
  ab_full = np.array([math.prod(1.0 - betas[:i + 1]) for i in range(1000)])
  ab = ab_full[timesteps]
  x = np.asarray(x_init, np.float64)
  xs, x0s = [], []
  for k in range(len(timesteps) - 1, -1, -1):
    ab_k = ab[k]
    ab_prev = ab[k - 1] if k > 0 else 1.0
    eps_hat = 0.1 * x + timesteps[k] / 1000.0
    x0 = np.sqrt(1.0 / ab_k) * x - np.sqrt(1.0 / ab_k - 1.0) * eps_hat
    eps = (np.sqrt(1.0 / ab_k) * x - x0) / np.sqrt(1.0 / ab_k - 1.0)
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab_k)) * np.sqrt(1 - ab_k / ab_prev)
    x = x0 * np.sqrt(ab_prev) + np.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
    if k != 0:
      x = x + sigma * np.asarray(noises[k], np.float64)
    xs.append(x)
    x0s.append(x0)
  return x, xs, x0s


class ScheduleTest(absltest.TestCase):

  def test_linear_tables_are_float64_and_match_closed_form(self):
    sched = schedules.linear_schedule()
    self.assertEqual(sched.num_steps, 1000)
    self.assertEqual(sched.betas.dtype, np.float64)
    self.assertEqual(sched.alphas_cumprod.dtype, np.float64)
    self.assertEqual(sched.betas[0], 0.0015)
    self.assertAlmostEqual(sched.betas[999], 0.0195, places=15)
    self.assertAlmostEqual(sched.betas[1] - sched.betas[0], 0.018 / 999, places=15)
    for i in (0, 1, 500, 999):
      expected = math.prod(1.0 - (0.0015 + 0.018 * j / 999) for j in range(i + 1))
      np.testing.assert_allclose(sched.alphas_cumprod[i], expected, rtol=1e-12)
    np.testing.assert_allclose(sched.alphas_cumprod[999], 2.569e-5, rtol=1e-3)
    np.testing.assert_array_equal(sched.alphas_cumprod_prev[:2], [1.0, sched.alphas_cumprod[0]])

  def test_lookups_cast_after_float64_math(self):
    sched = schedules.linear_schedule()
    t = jnp.array([0, 7, 999])
    ab = sched.alphas_cumprod[np.array([0, 7, 999])]
    cases = {
        sched.alphas_cumprod_at: ab,
        sched.sqrt_alphas_cumprod_at: np.sqrt(ab),
        sched.sqrt_one_minus_alphas_cumprod_at: np.sqrt(1 - ab),
        sched.sqrt_recip_alphas_cumprod_at: np.sqrt(1 / ab),
        sched.sqrt_recipm1_alphas_cumprod_at: np.sqrt(1 / ab - 1),
    }
    for fn, expected in cases.items():
      got = fn(t)
      self.assertEqual(got.dtype, jnp.float32)
      np.testing.assert_array_equal(np.asarray(got), expected.astype(np.float32))

  def test_respace_keeps_alpha_bars(self):
    sched = schedules.linear_schedule()
    kept = [0, 5, 500, 995]
    spaced = schedules.respace(sched, kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, sched.alphas_cumprod[kept], rtol=1e-13)
    self.assertEqual(spaced.alphas_cumprod_prev[0], 1.0)
    self.assertAlmostEqual(spaced.betas[0], sched.betas[0], places=15)


class GaussianTest(absltest.TestCase):

  def test_q_sample_closed_form(self):
    sched = schedules.linear_schedule()
    rng = np.random.default_rng(0)
    z0 = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    eps = rng.normal(size=z0.shape).astype(np.float32)
    t = np.array([0, 123, 999])
    got = gaussian.q_sample(sched, jnp.asarray(z0), jnp.asarray(t), jnp.asarray(eps))
    ab = np.cumprod(1 - np.linspace(0.0015, 0.0195, 1000))[t][:, None, None, None]
    expected = np.sqrt(ab) * z0 + np.sqrt(1 - ab) * eps
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)

  def test_eps_loss_draws_uniform_t_and_scores_eps(self):
    sched = schedules.linear_schedule()
    z0 = jnp.asarray(np.random.default_rng(1).normal(size=(16384, 2, 2, 1)), jnp.float32)
    key_t, key_eps = jax.random.key(1), jax.random.key(2)
    seen = {}

    def oracle(params, x_t, t):
      # Recovers the true eps from x_t, so the loss is ~0 iff x_t and t agree.
      seen["t"] = np.asarray(t)
      a = sched.sqrt_alphas_cumprod_at(t)[:, None, None, None]
      s = sched.sqrt_one_minus_alphas_cumprod_at(t)[:, None, None, None]
      return params * (x_t - a * z0) / s

    loss = gaussian.eps_loss(oracle, 1.0, z0, key_t, key_eps, sched)
    self.assertEqual(loss.shape, (16384,))
    t = seen["t"]
    self.assertTrue(np.issubdtype(t.dtype, np.integer))
    self.assertEqual((t.min(), t.max()), (0, 999))
    self.assertGreater(len(np.unique(t)), 990)
    # sqrt(1 - ab_0) ~ 0.04, so float32 round-off in the oracle can reach ~1e-6 on eps.
    self.assertLess(float(loss.max()), 1e-8)

    zero_loss = gaussian.eps_loss(oracle, 0.0, z0, key_t, key_eps, sched)
    eps = np.asarray(jax.random.normal(key_eps, z0.shape))
    np.testing.assert_allclose(np.asarray(zero_loss), (eps ** 2).mean(axis=(1, 2, 3)), rtol=1e-6)


class DDIMTest(absltest.TestCase):

  def test_ddim_timesteps(self):
    ts = samplers.ddim_timesteps(200)
    self.assertLen(ts, 200)
    np.testing.assert_array_equal(ts, np.arange(0, 1000, 5))
    self.assertEqual((ts[0], ts[-1]), (0, 995))
    # The stride search of guided-diffusion, not T // N (333 would give 4 steps).
    np.testing.assert_array_equal(samplers.ddim_timesteps(3), [0, 334, 668])
    with self.assertRaises(ValueError):
      samplers.ddim_timesteps(999)

  def test_ddim_matches_numpy_reference(self):
    sched = schedules.linear_schedule()
    shape, num_steps, key = (2, 4, 4, 3), 4, jax.random.key(3)
    sample = jax.jit(functools.partial(
        samplers.ddim_sample, _fake_eps, shape=shape, sched=sched, num_steps=num_steps,
        return_intermediates=2))
    final, prog = sample(jnp.float32(0.1), key)

    # The documented key contract: initial noise from split()[0], step k's noise
    # from fold_in(split()[1], k) for the spaced index k.
    key_init, key_loop = jax.random.split(key)
    x_init = jax.random.normal(key_init, shape)
    noises = [jax.random.normal(jax.random.fold_in(key_loop, k), shape) for k in range(num_steps)]
    timesteps = np.array([0, 250, 500, 750])
    ref, ref_xs, ref_x0s = _ddim_reference(x_init, noises, timesteps, eta=1.0)

    np.testing.assert_allclose(np.asarray(final), ref, rtol=2e-4, atol=2e-4)
    self.assertEqual(prog["x"].shape, (3, *shape))
    self.assertEqual(prog["pred_x0"].shape, (2, *shape))
    np.testing.assert_array_equal(np.asarray(prog["x"][0]), np.asarray(x_init))
    np.testing.assert_allclose(np.asarray(prog["x"][1:]), np.stack([ref_xs[1], ref_xs[3]]),
                               rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(prog["pred_x0"]), np.stack([ref_x0s[0], ref_x0s[2]]),
                               rtol=2e-4, atol=2e-4)

    plain = samplers.ddim_sample(_fake_eps, jnp.float32(0.1), key, shape, sched,
                                 num_steps=num_steps, eta=0.5)
    ref_half, _, _ = _ddim_reference(x_init, noises, timesteps, eta=0.5)
    np.testing.assert_allclose(np.asarray(plain), ref_half, rtol=2e-4, atol=2e-4)

  def test_ddim_is_deterministic_in_the_key(self):
    sched = schedules.linear_schedule()
    sample = jax.jit(functools.partial(samplers.ddim_sample, _fake_eps, shape=(2, 4, 4, 3),
                                       sched=sched, num_steps=5))
    a = np.asarray(sample(jnp.float32(0.1), jax.random.key(0)))
    b = np.asarray(sample(jnp.float32(0.1), jax.random.key(0)))
    c = np.asarray(sample(jnp.float32(0.1), jax.random.key(1)))
    np.testing.assert_array_equal(a, b)
    self.assertGreater(np.abs(a - c).mean(), 0.1)
    self.assertTrue(np.all(np.isfinite(a)))


  def test_limit_x0_rms_shrinks_only_the_large_x0(self):
    sched = schedules.linear_schedule()
    betas = np.linspace(0.0015, 0.0195, 1000)  # float64, independent of the schedule code
    ab = np.cumprod(1.0 - betas)
    t = np.array([10, 500, 990])
    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 4, 3)), np.float64)
    eps = 0.1 * x + t[:, None, None, None] / 1000.0  # _fake_eps with params 0.1
    a, s = np.sqrt(ab[t])[:, None, None, None], np.sqrt(1 - ab[t])[:, None, None, None]
    x0 = (x - s * eps) / a
    rms = np.sqrt(np.mean(x0 ** 2, axis=(1, 2, 3)))
    limit = float(np.median(rms))  # one example below, one at, one above the bound
    want_x0 = x0 * np.minimum(1.0, limit / rms)[:, None, None, None]
    want = (x - a * want_x0) / s
    limited = samplers.limit_x0_rms(_fake_eps, sched, limit)
    got = np.asarray(limited(jnp.float32(0.1), jnp.asarray(x, jnp.float32), jnp.asarray(t)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    self.assertEqual(int((rms > limit * 1.001).sum()), 1)
    np.testing.assert_allclose(got[rms <= limit], eps[rms <= limit], rtol=1e-4, atol=1e-4)
    # DDIM's last step returns its x0, so every sample ends within the bound.
    key, shape = jax.random.key(4), (4, 4, 4, 3)
    free = samplers.ddim_sample(_fake_eps, jnp.float32(0.1), key, shape, sched, num_steps=5)
    free_rms = np.sqrt(np.mean(np.square(np.asarray(free)), axis=(1, 2, 3)))
    bound = 0.5 * float(free_rms.min())
    bounded = samplers.ddim_sample(samplers.limit_x0_rms(_fake_eps, sched, bound),
                                   jnp.float32(0.1), key, shape, sched, num_steps=5)
    bounded_rms = np.sqrt(np.mean(np.square(np.asarray(bounded)), axis=(1, 2, 3)))
    np.testing.assert_array_less(bounded_rms, bound * (1 + 1e-4))


if __name__ == "__main__":
  absltest.main()
