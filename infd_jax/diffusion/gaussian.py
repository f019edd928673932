"""Forward process and the eps-prediction training loss (REFERENCE.md 6.2)."""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from infd_jax.diffusion.schedules import Schedule

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]  # (params, x_t, t) -> eps


def _per_example(coef: jax.Array, ndim: int) -> jax.Array:
  return coef.reshape(coef.shape + (1,) * (ndim - coef.ndim))


def q_sample(sched: Schedule, z0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """x_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps.

  Args:
    sched: the diffusion schedule.
    z0: [B, ...] clean data.
    t: [B] int steps.
    eps: noise shaped like z0.

  Returns:
    x_t shaped like z0.
  """
  a = _per_example(sched.sqrt_alphas_cumprod_at(t), z0.ndim)
  s = _per_example(sched.sqrt_one_minus_alphas_cumprod_at(t), z0.ndim)
  return a * z0 + s * eps


def eps_loss(apply_fn: ApplyFn, params: PyTree, z0: jax.Array, key_t: jax.Array,
             key_eps: jax.Array, sched: Schedule) -> jax.Array:
  """Per-example eps MSE with t ~ UniformInt{0..T-1} and eps ~ N(0, I).

  Args:
    apply_fn: (params, x_t [B, ...], t [B] int) -> predicted eps [B, ...].
    params: model parameters.
    z0: [B, H, W, C] clean latents (float32; float64 in x64 mode).
    key_t: key for the timesteps.
    key_eps: key for the noise.
    sched: the training schedule.

  Returns:
    [B], mean over (H, W, C) of (eps - model(x_t, t))^2 in z0's precision (at
    least float32); the training loss is its batch mean.
  """
  t, eps = draw_t_eps(key_t, key_eps, z0, sched)
  return eps_loss_at(apply_fn, params, z0, t, eps, sched)


def draw_t_eps(key_t: jax.Array, key_eps: jax.Array, z0: jax.Array, sched: Schedule
               ) -> tuple[jax.Array, jax.Array]:
  """t ~ UniformInt{0..T-1} [B] and eps ~ N(0, I) shaped like z0 (at least float32)."""
  t = jax.random.randint(key_t, (z0.shape[0],), 0, sched.num_steps)
  return t, jax.random.normal(key_eps, z0.shape, jnp.promote_types(z0.dtype, jnp.float32))


def eps_loss_at(apply_fn: ApplyFn, params: PyTree, z0: jax.Array, t: jax.Array, eps: jax.Array,
                sched: Schedule) -> jax.Array:
  """`eps_loss` at given steps t [B] and noise eps (shaped like z0): [B]."""
  full = jnp.promote_types(z0.dtype, jnp.float32)
  pred = apply_fn(params, q_sample(sched, z0.astype(full), t, eps.astype(full)), t)
  err = jnp.square(eps.astype(full) - pred.astype(full))
  return jnp.mean(err, axis=tuple(range(1, z0.ndim)))
