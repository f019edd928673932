"""Samplers from noise to x0, each one jit-able scan, and the time-step spacings.

`sample` dispatches on the sampler's name: "ddim" (REFERENCE.md 6.3, the official
one), "dpmpp_2m" and "unipc" (few-step ODE solvers, `solvers.py`).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from infd_jax.diffusion import SAMPLERS, SPACINGS, schedules, solvers
from infd_jax.diffusion.schedules import Schedule

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]  # (params, x_t, t) -> eps


def limit_x0_rms(apply_fn: ApplyFn, sched: Schedule, max_rms: float) -> ApplyFn:
  """The eps model with its implied x0 shrunk to an RMS of at most `max_rms` per example.

  x0 = (x - sqrt(1 - ab_t) eps) / sqrt(ab_t); where rms(x0) > max_rms it is scaled
  to max_rms and eps re-derived from it, so every sampler sees a bounded x0. An
  eps model's x0 is least accurate at high noise, where its errors are multiplied
  by 1 / sqrt(snr); there this keeps a poorly trained model's trajectories from
  overshooting the data. Not in the official sampler (demo-only; 0 = off).
  """
  def limited(params: PyTree, x: jax.Array, t: jax.Array) -> jax.Array:
    eps = apply_fn(params, x, t).astype(jnp.float32)
    shape = (-1,) + (1,) * (x.ndim - 1)
    a = sched.sqrt_alphas_cumprod_at(t).reshape(shape)
    s = sched.sqrt_one_minus_alphas_cumprod_at(t).reshape(shape)
    x0 = (x - s * eps) / a
    rms = jnp.sqrt(jnp.mean(jnp.square(x0), axis=tuple(range(1, x.ndim)), keepdims=True))
    x0 = x0 * jnp.minimum(1.0, max_rms / jnp.maximum(rms, 1e-12))
    return (x - a * x0) / s
  return limited


def _integer_stride(num_steps: int, num_train_steps: int) -> int | None:
  for stride in range(1, num_train_steps):
    if len(range(0, num_train_steps, stride)) == num_steps:
      return stride
  return None


def ddim_timesteps(num_steps: int, num_train_steps: int = 1000) -> np.ndarray:
  """Kept training steps for "ddim{num_steps}" respacing, ascending int32.

  As guided-diffusion's `space_timesteps`: the smallest integer stride s with
  len(range(0, T, s)) == num_steps, so 200 of 1000 gives {0, 5, ..., 995}.

  Raises:
    ValueError: if no integer stride gives exactly num_steps steps.
  """
  stride = _integer_stride(num_steps, num_train_steps)
  if stride is None:
    raise ValueError(f"cannot take exactly {num_steps} of {num_train_steps} steps "
                     "with an integer stride")
  return np.arange(0, num_train_steps, stride, dtype=np.int32)


def _distinct(ts: np.ndarray, num_train_steps: int) -> np.ndarray:
  """Rounded ascending steps made strictly increasing (collisions pushed upwards)."""
  ts = np.round(ts).astype(np.int64)
  for k in range(1, len(ts)):
    ts[k] = max(ts[k], ts[k - 1] + 1)
  for k in range(len(ts) - 2, -1, -1):  # and back below the top step
    ts[k] = min(ts[k], ts[k + 1] - 1)
  if ts[-1] > num_train_steps - 1 or ts[0] < 0:
    raise ValueError("more steps than training steps")
  return ts.astype(np.int32)


def spaced_timesteps(sched: Schedule, num_steps: int, spacing: str = "uniform") -> np.ndarray:
  """The `num_steps` distinct training steps a sampler calls the model at, ascending int32.

  "uniform": the official DDIM respacing (`ddim_timesteps`, {0, 5, ..., 995} for
    200) when an integer stride gives exactly `num_steps`, else steps round(k T / N);
  "logsnr": uniform in lambda = log(alpha / sigma) from step T-1 down to step 0,
    each rounded to the training step of nearest lambda;
  "quadratic": round((T - 1) (k / (N - 1))^2), dense near the data.
  All include step 0 (N >= 2); "logsnr" and "quadratic" also T - 1; one step is
  always [T - 1]. Rounding collisions are moved to neighbouring free steps, so
  there are always N distinct steps.

  Raises:
    ValueError: for an unknown spacing or num_steps outside 1..T.
  """
  t_max = sched.num_steps
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; use one of {SPACINGS}")
  if not 1 <= num_steps <= t_max:
    raise ValueError(f"num_steps={num_steps} must be in 1..{t_max}")
  if num_steps == 1:  # one step: from pure noise at the last training step
    return np.array([t_max - 1], np.int32)
  if spacing == "uniform":
    if _integer_stride(num_steps, t_max) is not None:
      return ddim_timesteps(num_steps, t_max)
    return _distinct(np.arange(num_steps) * t_max / num_steps, t_max)
  if spacing == "logsnr":
    lam = schedules.log_snr(sched, np.arange(t_max))  # decreasing in t
    targets = np.linspace(lam[0], lam[-1], num_steps)  # ascending t
    nearest = np.abs(lam[None, :] - targets[:, None]).argmin(axis=1)
    return _distinct(nearest.astype(np.float64), t_max)
  return _distinct((t_max - 1) * np.linspace(0.0, 1.0, num_steps) ** 2, t_max)


def ddim_x0(spaced: Schedule, k: jax.Array, x: jax.Array, eps_hat: jax.Array) -> jax.Array:
  """x0 predicted at spaced step k: sqrt(1/ab_k) x - sqrt(1/ab_k - 1) eps_hat (no clipping)."""
  recip, recipm1 = spaced.sqrt_recip_alphas_cumprod_at(k), spaced.sqrt_recipm1_alphas_cumprod_at(k)
  return recip * x - recipm1 * eps_hat


def ddim_update(spaced: Schedule, k: jax.Array, x: jax.Array, x0: jax.Array, *, eta: float,
                key: jax.Array) -> jax.Array:
  """One DDIM step from x at spaced step k to step k - 1, given the predicted x0.

  eps is re-derived from x0, sigma = eta sqrt((1 - ab_prev)/(1 - ab_k)) sqrt(1 - ab_k/ab_prev)
  and x <- sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + [k > 0] sigma z, with
  z ~ N(0, I) from fold_in(key, k) (REFERENCE.md 6.3).
  """
  recip, recipm1 = spaced.sqrt_recip_alphas_cumprod_at(k), spaced.sqrt_recipm1_alphas_cumprod_at(k)
  eps = (recip * x - x0) / recipm1
  ab, ab_prev = spaced.alphas_cumprod_at(k), spaced.alphas_cumprod_prev_at(k)
  sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
  mean = x0 * jnp.sqrt(ab_prev) + jnp.sqrt(1 - ab_prev - sigma ** 2) * eps
  noise = jax.random.normal(jax.random.fold_in(key, k), x.shape, jnp.float32)
  return mean + jnp.where(k > 0, sigma, 0.0) * noise


def ddim_order(num_steps: int) -> jax.Array:
  """Spaced step indices in sampling order, from the noisiest (num_steps - 1) down to 0."""
  return jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)


def ddim_sample(apply_fn: ApplyFn, params: PyTree, key: jax.Array, shape: tuple[int, ...],
                sched: Schedule, *, num_steps: int = 200, eta: float = 1.0,
                spacing: str = "uniform", return_intermediates: int | None = None,
                batch_sharding: jax.sharding.Sharding | None = None
                ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  """DDIM from x ~ N(0, I) down to step 0, no clipping of x0.

  With spaced alpha-bars ab_k = ab[t_k] (ab_prev = 1 at k = 0), each step
  predicts x0 (`ddim_x0`) and moves to step k - 1 (`ddim_update`). The model is
  called with the original step t_k. Randomness: the initial
  noise and the noise of spaced step k come from split/fold_in of `key`, so a
  key fixes the sample. Jit with `apply_fn`, `shape`, `sched`, `num_steps`,
  `eta`, `spacing`, `return_intermediates` and `batch_sharding` static.

  Args:
    apply_fn: (params, x [B, ...], t [B] int) -> eps [B, ...].
    params: model parameters.
    key: PRNG key.
    shape: sample shape, e.g. (B, 64, 64, 3).
    sched: the full training schedule.
    num_steps: number of DDIM steps (model calls).
    eta: DDIM stochasticity (1.0 in INFD).
    spacing: see `spaced_timesteps`; "uniform" is the official respacing.
    return_intermediates: K (dividing num_steps) to also return progress.
    batch_sharding: if given, x is constrained to it (the batch over the mesh).

  Returns:
    The final sample [*shape] float32; with K also a dict with "x"
    [num_steps/K + 1, *shape] (the initial noise, then x after steps K, 2K, ...,
    num_steps) and "pred_x0" [num_steps/K, *shape] (x0 predicted in steps 1,
    K+1, 2K+1, ...), as the official `ret_prog_chunks` visualisation keeps them.
  """
  ts = spaced_timesteps(sched, num_steps, spacing)
  spaced = schedules.respace(sched, ts)
  ts = jnp.asarray(ts)
  x_init, key_loop = solvers.initial_noise(key, shape, batch_sharding)

  def step(x: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = jnp.full((shape[0],), ts[k], dtype=jnp.int32)
    x0 = ddim_x0(spaced, k, x, apply_fn(params, x, t).astype(jnp.float32))
    x = ddim_update(spaced, k, x, x0, eta=eta, key=key_loop)
    return solvers.constrain(x, batch_sharding), x0

  order = ddim_order(num_steps)
  if return_intermediates is None:
    x, _ = jax.lax.scan(lambda x, k: (step(x, k)[0], None), x_init, order)
    return x

  every = return_intermediates
  if num_steps % every:
    raise ValueError(f"return_intermediates={every} must divide num_steps={num_steps}")

  def chunk(x: jax.Array, ks: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    def body(carry, k):
      x, first_x0 = carry
      x, x0 = step(x, k)
      return (x, jnp.where(k == ks[0], x0, first_x0)), None
    (x, first_x0), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), ks)
    return x, (x, first_x0)

  x, (xs, x0s) = jax.lax.scan(chunk, x_init, order.reshape(num_steps // every, every))
  return x, {"x": jnp.concatenate([x_init[None], xs]), "pred_x0": x0s}


def sample(name: str, apply_fn: ApplyFn, params: PyTree, key: jax.Array, shape: tuple[int, ...],
           sched: Schedule, *, num_steps: int, eta: float = 0.0, spacing: str = "uniform",
           batch_sharding: jax.sharding.Sharding | None = None) -> jax.Array:
  """x0 [*shape] float32 from the sampler `name` with `num_steps` model calls.

  Every sampler draws its initial noise x_T ~ N(0, I) from `split(key)[0]`, so
  the same key starts all of them from the same noise. `eta` is DDIM's
  stochasticity; "dpmpp_2m" and "unipc" solve the probability-flow ODE (eta is
  not used). Trace under jit with all but `params` and `key` static.

  Raises:
    ValueError: for an unknown sampler or spacing.
  """
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; use one of {SAMPLERS}")
  if name == "ddim":
    return ddim_sample(apply_fn, params, key, shape, sched, num_steps=num_steps, eta=eta,
                       spacing=spacing, batch_sharding=batch_sharding)
  solver = {"dpmpp_2m": solvers.dpmpp_2m_sample, "unipc": solvers.unipc_sample}[name]
  return solver(apply_fn, params, key, shape, sched, spaced_timesteps(sched, num_steps, spacing),
                batch_sharding=batch_sharding)
