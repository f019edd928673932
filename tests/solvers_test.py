"""Tests for the time-step spacings, DPM-Solver++(2M), UniPC and the sampler dispatcher."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from infd_jax.diffusion import samplers
from infd_jax.diffusion import schedules

T = 1000
AB = np.cumprod(1.0 - np.linspace(0.0015, 0.0195, T))  # float64, independent of schedules.py
LAM = 0.5 * np.log(AB / (1.0 - AB))
SCHED = schedules.linear_schedule()


# Independent float64 numpy solvers, written in the papers' loop form for any eps model.

def _grid(ts):
  """Descending steps; alpha, sigma, lambda at them and at the clean point (1, 0, inf)."""
  ts = np.sort(np.asarray(ts))[::-1]
  alpha = np.append(np.sqrt(AB[ts]), 1.0)
  sigma = np.append(np.sqrt(1.0 - AB[ts]), 0.0)
  return ts, alpha, sigma, np.append(LAM[ts], np.inf)


def _ref_dpmpp_2m(eps_fn, x_init, ts):
  """Lu et al. 2022, Algorithm 2 (DPM-Solver++(2M)); first order at the first and last step."""
  ts, alpha, sigma, lam = _grid(ts)
  n, x, d_prev = len(ts), np.asarray(x_init, np.float64), None
  for i in range(1, n + 1):
    d_cur = (x - sigma[i - 1] * eps_fn(x, ts[i - 1])) / alpha[i - 1]
    h = lam[i] - lam[i - 1]
    if i in (1, n):
      d = d_cur
    else:
      r = (lam[i - 1] - lam[i - 2]) / h
      d = (1 + 1 / (2 * r)) * d_cur - 1 / (2 * r) * d_prev
    x = sigma[i] / sigma[i - 1] * x - alpha[i] * np.expm1(-h) * d
    d_prev = d_cur
  return x


def _ref_unipc(eps_fn, x_init, ts):
  """Zhao et al. 2023, UniPC-2 with B(h) = e^h - 1 (data prediction, h -> -h), multistep.

  Step i: corrector UniC on x_{i-1} with the model output at the predicted x_{i-1}
  (UniC-1 at the first point, UniC-2 after), then predictor UniP (UniP-2 with
  a_1 = 1/2 between the first and the last step).
  """
  ts, alpha, sigma, lam = _grid(ts)
  n, x = len(ts), np.asarray(x_init, np.float64)
  ms, x_corr_prev = [], x

  def b_terms(h):  # b_k = k! h phi_{k+1}(h) / B(h), with hh = -h in the data form
    hh = -h
    big_b, phi_k, fact, out = np.expm1(hh), np.expm1(hh) / hh - 1.0, 1.0, []
    for k in (1, 2):
      out.append(phi_k * fact / big_b)
      fact *= k + 1
      phi_k = phi_k / hh - 1.0 / fact
    return big_b, np.array(out)

  for i in range(1, n + 1):
    ms.append((x - sigma[i - 1] * eps_fn(x, ts[i - 1])) / alpha[i - 1])
    j = i - 1
    if j >= 1:  # UniC on x_j
      h = lam[j] - lam[j - 1]
      big_b, b = b_terms(h)
      base = sigma[j] / sigma[j - 1] * x_corr_prev - alpha[j] * np.expm1(-h) * ms[j - 1]
      d1_t = ms[j] - ms[j - 1]
      if j == 1:
        corr = 0.5 * d1_t
      else:
        r = (lam[j - 2] - lam[j - 1]) / h
        rho = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), b)
        corr = rho[0] * (ms[j - 2] - ms[j - 1]) / r + rho[1] * d1_t
      x = base - alpha[j] * big_b * corr
    x_corr_prev = x
    h = lam[i] - lam[i - 1]
    x = sigma[i] / sigma[i - 1] * x - alpha[i] * np.expm1(-h) * ms[i - 1]
    if 2 <= i <= n - 1:  # UniP-2
      big_b, _ = b_terms(h)
      r = (lam[i - 2] - lam[i - 1]) / h
      x = x - alpha[i] * big_b * 0.5 * (ms[i - 2] - ms[i - 1]) / r
  return x


def _ref_ddim0(eps_fn, x_init, ts):
  ts, alpha, sigma, _ = _grid(ts)
  x = np.asarray(x_init, np.float64)
  for i in range(1, len(ts) + 1):
    eps = eps_fn(x, ts[i - 1])
    x0 = (x - sigma[i - 1] * eps) / alpha[i - 1]
    x = alpha[i] * x0 + sigma[i] * eps
  return x


REFERENCES = {"dpmpp_2m": _ref_dpmpp_2m, "unipc": _ref_unipc, "ddim": _ref_ddim0}

# Gaussian data x0 ~ N(MU, S^2 I): exact eps prediction and probability-flow map.
MU, S = 0.3, 0.5


def _gauss_eps(params, x, t):
  del params
  ab = jnp.asarray(AB, jnp.float32)[t].reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * S ** 2 + 1 - ab)


def _gauss_flow(x, t_from, t_to):
  """The exact PF-ODE map: the standardised (x - alpha MU) / std_t is conserved."""
  def std(t):
    return np.sqrt(S ** 2) if t is None else np.sqrt(AB[t] * S ** 2 + 1 - AB[t])
  mean_to = MU if t_to is None else np.sqrt(AB[t_to]) * MU
  return mean_to + std(t_to) * (x - np.sqrt(AB[t_from]) * MU) / std(t_from)


def _fake_eps(params, x, t):
  """A nonlinear stand-in for the UNet that depends on x and t."""
  return params * jnp.tanh(x) + jnp.cos(t.astype(jnp.float32) / 300.0)[:, None, None, None]


@functools.partial(jax.jit, static_argnames=("name", "eps_fn", "shape", "num_steps", "spacing"))
def _sample(params, key, *, name, eps_fn, shape, num_steps, spacing="uniform"):
  return samplers.sample(name, eps_fn, params, key, shape, SCHED, num_steps=num_steps, eta=0.0,
                         spacing=spacing)


class SpacingTest(parameterized.TestCase):

  def test_uniform_is_the_official_respacing_and_extends_to_any_count(self):
    np.testing.assert_array_equal(samplers.spaced_timesteps(SCHED, 200), np.arange(0, 1000, 5))
    np.testing.assert_array_equal(samplers.spaced_timesteps(SCHED, 10), np.arange(0, 1000, 100))
    # 999 steps has no integer stride: round(k * 1000 / 999) made distinct.
    ts = samplers.spaced_timesteps(SCHED, 999)
    self.assertEqual((len(np.unique(ts)), ts[0], ts[-1]), (999, 0, 999))
    np.testing.assert_array_equal(samplers.spaced_timesteps(SCHED, 1, "uniform"), [999])

  def test_logsnr_and_quadratic(self):
    ts = samplers.spaced_timesteps(SCHED, 12, "logsnr")
    self.assertEqual((ts[0], ts[-1], len(np.unique(ts))), (0, 999, 12))
    targets = np.linspace(LAM[0], LAM[999], 12)
    for t, target in zip(ts, targets):  # the nearest training step in lambda
      self.assertLessEqual(abs(LAM[t] - target), np.abs(LAM - target).min() + 1e-12)
    # Many steps: the collisions near step 0 (lambda gaps up to 0.35) are pushed upwards.
    ts = samplers.spaced_timesteps(SCHED, 100, "logsnr")
    self.assertEqual((len(np.unique(ts)), ts[0], ts[-1]), (100, 0, 999))
    np.testing.assert_array_equal(ts[:4], [0, 1, 2, 3])
    np.testing.assert_array_equal(samplers.spaced_timesteps(SCHED, 4, "quadratic"),
                                  np.round(999 * np.array([0, 1, 4, 9]) / 9))

  def test_bad_names_and_counts(self):
    with self.assertRaisesRegex(ValueError, "spacing 'cosine'"):
      samplers.spaced_timesteps(SCHED, 10, "cosine")
    with self.assertRaisesRegex(ValueError, "1..1000"):
      samplers.spaced_timesteps(SCHED, 0)
    with self.assertRaisesRegex(ValueError, "sampler 'euler'"):
      samplers.sample("euler", _fake_eps, 0.1, jax.random.key(0), (1, 2, 2, 1), SCHED,
                      num_steps=2)


class SolverTest(parameterized.TestCase):

  @parameterized.product(name=("dpmpp_2m", "unipc"), spacing=("uniform", "logsnr"))
  def test_matches_float64_reference_of_the_paper(self, name, spacing):
    shape, key, num_steps = (2, 4, 4, 3), jax.random.key(3), 6
    got = _sample(jnp.float32(0.5), key, name=name, eps_fn=_fake_eps, shape=shape,
                  num_steps=num_steps, spacing=spacing)
    x_init = np.asarray(jax.random.normal(jax.random.split(key)[0], shape), np.float64)

    def eps_np(x, t):
      return 0.5 * np.tanh(x) + np.cos(t / 300.0)
    ts = samplers.spaced_timesteps(SCHED, num_steps, spacing)
    want = REFERENCES[name](eps_np, x_init, ts)
    self.assertEqual(got.dtype, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    # Not a first-order step in disguise: DDIM (eta 0) on the same steps differs.
    self.assertGreater(np.abs(want - _ref_ddim0(eps_np, x_init, ts)).max(), 1e-2)

  def test_exact_gaussian_flow_beats_ddim_at_the_expected_order(self):
    shape, key = (512, 1, 1, 1), jax.random.key(0)
    x_init = np.asarray(jax.random.normal(jax.random.split(key)[0], shape), np.float64)

    def error(name, num_steps, spacing, to_clean=True):
      x = np.asarray(_sample(0.0, key, name=name, eps_fn=_gauss_eps, shape=shape,
                             num_steps=num_steps, spacing=spacing), np.float64)
      ts = samplers.spaced_timesteps(SCHED, num_steps, spacing)
      if to_clean:
        exact = _gauss_flow(x_init, ts[-1], None)
      else:  # exact flow to the lowest model step, then the samplers' (first-order) last step
        x_low = _gauss_flow(x_init, ts[-1], ts[0])
        eps = np.sqrt(1 - AB[ts[0]]) * (x_low - np.sqrt(AB[ts[0]]) * MU) / (
            AB[ts[0]] * S ** 2 + 1 - AB[ts[0]])
        exact = (x_low - np.sqrt(1 - AB[ts[0]]) * eps) / np.sqrt(AB[ts[0]])
      return float(np.sqrt(np.mean((x - exact) ** 2)))

    # Uniform steps in t leave few steps where this x0 prediction changes fastest (low t,
    # large lambda steps), so the solvers gain little there; uniform in lambda they win big.
    for spacing, factor in (("uniform", 1.0), ("logsnr", 0.3)):
      for num_steps in (10, 20):
        ddim = error("ddim", num_steps, spacing)
        for name in ("dpmpp_2m", "unipc"):
          self.assertLess(error(name, num_steps, spacing), factor * ddim,
                          (name, num_steps, spacing))
    # Observed order over 10 -> 20 -> 40 steps (quadratic spacing keeps refining the whole
    # path; the last step's own error, ~1e-3 here, is taken out as it does not shrink).
    # Measured in float64 numpy: DDIM 1.0, DPM-Solver++(2M) 2.0, UniPC-2 2.9.
    orders = {}
    for name in ("ddim", "dpmpp_2m", "unipc"):
      errs = [error(name, n, "quadratic", to_clean=False) for n in (10, 20, 40)]
      orders[name] = np.log2(errs[0] / errs[2]) / 2
    self.assertBetween(orders["ddim"], 0.8, 1.2)
    self.assertBetween(orders["dpmpp_2m"], 1.7, 2.5)
    self.assertBetween(orders["unipc"], 2.4, 3.5)

  def test_one_and_two_steps_are_first_order(self):
    # With one step every sampler returns x0(x_T, 999); with two, DPM-Solver++(2M) = DDIM.
    kw = dict(eps_fn=_fake_eps, shape=(2, 4, 4, 3))
    key = jax.random.key(5)
    one = [_sample(jnp.float32(0.5), key, name=n, num_steps=1, **kw) for n in samplers.SAMPLERS]
    for x in one[1:]:
      np.testing.assert_allclose(np.asarray(x), np.asarray(one[0]), rtol=1e-5, atol=1e-5)
    two = [_sample(jnp.float32(0.5), key, name=n, num_steps=2, **kw) for n in ("ddim", "dpmpp_2m")]
    np.testing.assert_allclose(np.asarray(two[0]), np.asarray(two[1]), rtol=1e-5, atol=1e-5)

  @parameterized.parameters("dpmpp_2m", "unipc")
  def test_deterministic_sharded_and_bfloat16(self, name):
    shape = (8, 4, 4, 3)
    run = functools.partial(_sample, jnp.float32(0.5), name=name, eps_fn=_fake_eps, shape=shape,
                            num_steps=5)
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    self.assertGreater(float(jnp.abs(a - c).mean()), 0.1)

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))

    def bf16_eps(params, x, t):
      return _fake_eps(params, x.astype(jnp.bfloat16), t).astype(jnp.bfloat16)
    sharded = jax.jit(lambda key, eps_fn: samplers.sample(
        name, eps_fn, jnp.float32(0.5), key, shape, SCHED, num_steps=5, batch_sharding=batch),
                      static_argnums=1)
    got = sharded(jax.random.key(0), _fake_eps)
    self.assertEqual(got.sharding, batch)
    # Sharded and single-device programs fuse differently: a few float32 ulps (4.3e-6 seen on
    # some hosts), far below the 0.1 that separates two seeds.
    np.testing.assert_allclose(np.asarray(got), np.asarray(a), rtol=1e-5, atol=1e-5)
    low = sharded(jax.random.key(0), bf16_eps)
    self.assertEqual(low.dtype, jnp.float32)
    self.assertLess(float(jnp.linalg.norm(low - a) / jnp.linalg.norm(a)), 1e-2)


if __name__ == "__main__":
  absltest.main()
