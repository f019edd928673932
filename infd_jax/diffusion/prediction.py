"""Model outputs other than eps, and classifier-free guidance, as eps models for the samplers.

Every sampler takes an eps model (params, x_t, t) -> eps. A v-prediction model
(Salimans & Ho 2022; SD 2.x 768-v) outputs v = sqrt(ab) eps - sqrt(1 - ab) x0,
so eps = sqrt(1 - ab) x_t + sqrt(ab) v. Classifier-free guidance (Ho & Salimans
2022) evaluates the model on the prompt's and the empty prompt's context in one
doubled batch and returns out_u + scale (out_c - out_u); it is linear in the
output, so guiding v and then converting equals converting and then guiding.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from infd_jax.diffusion.schedules import Schedule

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]  # (params, x_t, t) -> eps
# (params, x_t [B, ...], t [B], context [B, M, C]) -> eps or v
ContextApplyFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], jax.Array]
PREDICTIONS = ("eps", "v")


def _coef(values: jax.Array, ndim: int) -> jax.Array:
  return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def eps_from_v(sched: Schedule, x: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v; x [B, ...], t [B] int."""
  a = _coef(sched.sqrt_alphas_cumprod_at(t), x.ndim)
  s = _coef(sched.sqrt_one_minus_alphas_cumprod_at(t), x.ndim)
  return s * x + a * v.astype(jnp.float32)


def v_target(sched: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0, the v-prediction training target."""
  a = _coef(sched.sqrt_alphas_cumprod_at(t), x0.ndim)
  s = _coef(sched.sqrt_one_minus_alphas_cumprod_at(t), x0.ndim)
  return a * eps - s * x0


def as_eps(apply_fn: ContextApplyFn, sched: Schedule, prediction: str) -> ContextApplyFn:
  """The model as an eps predictor (identity for "eps")."""
  if prediction not in PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
  if prediction == "eps":
    return apply_fn
  return lambda params, x, t, ctx: eps_from_v(sched, x, t, apply_fn(params, x, t, ctx))


def guided(apply_fn: ContextApplyFn, context: jax.Array, uncond: jax.Array,
           scale: float | jax.Array) -> ApplyFn:
  """Classifier-free guidance: an ApplyFn for the samplers.

  Args:
    apply_fn: the conditional model (params, x, t, context) -> eps (see `as_eps`).
    context: [B, M, C] the prompts' text context.
    uncond: [B, M, C] (or [1, M, C], broadcast) the empty prompt's context.
    scale: guidance scale; 1 is the conditional model alone, 0 the unconditional.

  Returns:
    (params, x [B, ...], t [B]) -> eps_u + scale (eps_c - eps_u), float32.
  """
  uncond = jnp.broadcast_to(uncond, context.shape)

  def eps(params: PyTree, x: jax.Array, t: jax.Array) -> jax.Array:
    out = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([uncond, context])).astype(jnp.float32)
    out_u, out_c = jnp.split(out, 2)
    return out_u + scale * (out_c - out_u)
  return eps
