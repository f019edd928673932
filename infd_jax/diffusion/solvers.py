"""Few-step probability-flow ODE solvers: DPM-Solver++(2M) and UniPC-2 (B(h) = expm1(h)).

Both work in the data-prediction form on the discrete VP schedule: with
alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t) and lambda_t = log(alpha_t / sigma_t),
the eps model gives x0(x, t) = (x - sigma_t eps(x, t)) / alpha_t. The model is
called at N distinct training steps s_0 > s_1 > ... > s_{N-1} (one call each);
a last step goes from s_{N-1} to the clean point (alpha = 1, sigma = 0,
lambda = inf), where every exponential integrator of first order returns
x0(x, s_{N-1}), as DDIM's last step does. That step and the first one are of
first order (equal to DDIM with eta 0); the steps between use the history.

All step coefficients depend only on the lambda grid, so they are computed
once in float64 numpy and the jitted scan only forms linear combinations in
float32 (the model output is cast to float32 whatever the compute dtype).

References: Lu et al. 2022, "DPM-Solver++" (Algorithm 2, multistep second
order); Zhao et al. 2023, "UniPC" (UniP-2 predictor with the UniC-2 corrector,
B(h) = e^h - 1; the corrector reuses the model call of the next step, so a
solve costs N calls, and the point whose model output feeds the last step is
not corrected).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infd_jax.diffusion.schedules import Schedule

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]  # (params, x_t, t) -> eps


def initial_noise(key: jax.Array, shape: tuple[int, ...],
                  batch_sharding: jax.sharding.Sharding | None) -> tuple[jax.Array, jax.Array]:
  """x_T ~ N(0, I) from split(key)[0] (the same for every sampler) and the other key."""
  key_init, key_rest = jax.random.split(key)
  return constrain(jax.random.normal(key_init, shape, jnp.float32), batch_sharding), key_rest


def constrain(x: jax.Array, batch_sharding: jax.sharding.Sharding | None) -> jax.Array:
  return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)


def _grid(sched: Schedule, timesteps: np.ndarray):
  """Descending steps s_i, and alpha, sigma, lambda at s_0..s_{N-1} and the clean point."""
  ts = np.sort(np.asarray(timesteps, np.int64))[::-1]
  if len(np.unique(ts)) != len(ts) or len(ts) == 0:
    raise ValueError("timesteps must be distinct and non-empty")
  ab = sched.alphas_cumprod[ts]
  alpha = np.append(np.sqrt(ab), 1.0)
  sigma = np.append(np.sqrt(1.0 - ab), 0.0)
  lam = np.append(0.5 * (np.log(ab) - np.log1p(-ab)), np.inf)
  return ts, alpha, sigma, lam


def _first_order(alpha: np.ndarray, sigma: np.ndarray, lam: np.ndarray):
  """x_i = a_i x_{i-1} + phi_i x0_{i-1}: a = sigma_i / sigma_{i-1}, phi = -alpha_i expm1(-h_i)."""
  h = np.diff(lam)  # h_i = lambda_i - lambda_{i-1}, i = 1..N; h_N = inf
  return sigma[1:] / sigma[:-1], -alpha[1:] * np.expm1(-h), h


def dpmpp_2m_coefficients(sched: Schedule, timesteps: np.ndarray) -> dict[str, np.ndarray]:
  """Per step i = 1..N: x_i = a x_{i-1} + c_cur x0_{i-1} + c_prev x0_{i-2} (float64).

  DPM-Solver++(2M): D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2} with
  r_i = h_{i-1} / h_i, and x_i = a_i x_{i-1} + phi_i D_i; first order (D_i =
  x0_{i-1}) at i = 1 and at the last step i = N (to the clean point).
  Also returns "t" (the steps of the model calls) and "x0_scale", "eps_scale"
  (x0 = x0_scale x - eps_scale eps) per call.
  """
  ts, alpha, sigma, lam = _grid(sched, timesteps)
  a, phi, h = _first_order(alpha, sigma, lam)
  n = len(ts)
  c_cur, c_prev = phi.copy(), np.zeros(n)
  for i in range(2, n):  # 1-based step i uses h[i-1] (= h_i) and h[i-2] (= h_{i-1})
    r = h[i - 2] / h[i - 1]
    c_cur[i - 1] = phi[i - 1] * (1.0 + 0.5 / r)
    c_prev[i - 1] = -phi[i - 1] * 0.5 / r
  return dict(t=ts, x0_scale=1.0 / alpha[:-1], eps_scale=sigma[:-1] / alpha[:-1],
              a=a, c_cur=c_cur, c_prev=c_prev)


def _unipc_b(h: float) -> tuple[float, float, float]:
  """B(h) = expm1(-h) and the UniC right-hand side b_1, b_2 for the data-prediction form."""
  hh = -h
  big_b = np.expm1(hh)
  g1 = np.expm1(hh) / hh - 1.0
  g2 = g1 / hh - 0.5
  return big_b, g1 / big_b, 2.0 * g2 / big_b


def unipc_coefficients(sched: Schedule, timesteps: np.ndarray) -> dict[str, np.ndarray]:
  """Per step i = 1..N (float64), with m_j = x0(x_j, s_j) of the predicted x_j:

  corrector of x_{i-1}:  xc = xb_{i-1} + u m_{i-1} + v m_{i-2} + w m_{i-3},
  base step:             xb_i = a xc + phi m_{i-1},
  predictor:             x_i = xb_i + p (m_{i-2} - m_{i-1}).

  With K_i = -alpha_i B(h_i) and r_i = (lambda_{i-2} - lambda_{i-1}) / h_i: the
  predictor UniP-2 adds K 0.5 D1 with D1 = (m_{i-2} - m_{i-1}) / r_i (not at
  i = 1, nor at the last step); the corrector UniC at point j adds
  K_j (rho_0 D1_j + rho_1 (m_j - m_{j-1})) with rho solving
  [[1, 1], [r_j, 1]] rho = [b_1, b_2] (UniC-2), or rho_1 = 0.5 alone at j = 1.
  """
  ts, alpha, sigma, lam = _grid(sched, timesteps)
  a, phi, h = _first_order(alpha, sigma, lam)
  n = len(ts)
  u, v, w, p = (np.zeros(n) for _ in range(4))
  for i in range(2, n):  # predictor of step i (1-based), second order
    big_b, _, _ = _unipc_b(h[i - 1])
    r = (lam[i - 2] - lam[i - 1]) / h[i - 1]
    p[i - 1] = -alpha[i] * big_b * 0.5 / r
  for j in range(1, n):  # corrector of point j, applied in step j + 1 (0-based index j)
    big_b, b1, b2 = _unipc_b(h[j - 1])
    k = -alpha[j] * big_b
    if j == 1:
      u[j], v[j] = 0.5 * k, -0.5 * k
    else:
      r = (lam[j - 2] - lam[j - 1]) / h[j - 1]
      rho0, rho1 = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array([b1, b2]))
      u[j], v[j], w[j] = k * rho1, k * (-rho0 / r - rho1), k * rho0 / r
  return dict(t=ts, x0_scale=1.0 / alpha[:-1], eps_scale=sigma[:-1] / alpha[:-1],
              u=u, v=v, w=w, a=a, phi=phi, p=p)


def _scan_inputs(coefs: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v, jnp.int32 if k == "t" else jnp.float32) for k, v in coefs.items()}


def _x0(apply_fn: ApplyFn, params: PyTree, x: jax.Array, c: dict[str, jax.Array]) -> jax.Array:
  t = jnp.full((x.shape[0],), c["t"], jnp.int32)
  eps = apply_fn(params, x, t).astype(jnp.float32)
  return c["x0_scale"] * x - c["eps_scale"] * eps


def dpmpp_2m_sample(apply_fn: ApplyFn, params: PyTree, key: jax.Array, shape: tuple[int, ...],
                    sched: Schedule, timesteps: np.ndarray, *,
                    batch_sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """DPM-Solver++(2M) from x_T ~ N(0, I) (`initial_noise`) to x0 [*shape] float32.

  Args:
    apply_fn: (params, x [B, ...] float32, t [B] int32) -> eps, any float dtype.
    params: model parameters.
    key: PRNG key (only the initial noise is random).
    shape: sample shape.
    sched: the training schedule.
    timesteps: the N distinct training steps of the model calls (any order).
    batch_sharding: if given, the state is constrained to it.
  """
  coefs = _scan_inputs(dpmpp_2m_coefficients(sched, timesteps))
  x_init, _ = initial_noise(key, shape, batch_sharding)

  def step(carry, c):
    x, m_prev = carry
    m = _x0(apply_fn, params, x, c)
    x = constrain(c["a"] * x + c["c_cur"] * m + c["c_prev"] * m_prev, batch_sharding)
    return (x, m), None

  (x, _), _ = jax.lax.scan(step, (x_init, jnp.zeros_like(x_init)), coefs)
  return x


def unipc_sample(apply_fn: ApplyFn, params: PyTree, key: jax.Array, shape: tuple[int, ...],
                 sched: Schedule, timesteps: np.ndarray, *,
                 batch_sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """UniPC-2 (bh2) from x_T ~ N(0, I) to x0 [*shape] float32; arguments as `dpmpp_2m_sample`."""
  coefs = _scan_inputs(unipc_coefficients(sched, timesteps))
  x_init, _ = initial_noise(key, shape, batch_sharding)
  zeros = jnp.zeros_like(x_init)

  def step(carry, c):
    x, x_base, m1, m2 = carry  # predicted x_{i-1}, its base xb_{i-1}, m_{i-2}, m_{i-3}
    m = _x0(apply_fn, params, x, c)
    x_corr = x_base + c["u"] * m + c["v"] * m1 + c["w"] * m2
    x_base = c["a"] * x_corr + c["phi"] * m
    x = constrain(x_base + c["p"] * (m1 - m), batch_sharding)
    return (x, x_base, m, m1), None

  (x, _, _, _), _ = jax.lax.scan(step, (x_init, x_init, zeros, zeros), coefs)
  return x
