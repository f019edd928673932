"""DDIM with DPS-style guidance (Chung et al. 2023): no training, any differentiable loss.

Each DDIM step k predicts eps and x0 = sqrt(1/ab_k) x - sqrt(1/ab_k - 1) eps from
x_t; on the guided steps it also evaluates `loss_fn(x0)` and moves the DDIM
update by minus its gradient with respect to x_t (through the denoiser):

  x_{k-1} = DDIM(x_t, eps) - grad_{x_t} loss_fn(x0(x_t)).

`loss_fn` carries the per-condition scales (`conditions.Objective.weighted`).
The DDIM part is `infd_jax.diffusion.samplers`' own (`ddim_x0`, `ddim_update`,
the same time-step spacings and noise draws from the key), so guidance off
reproduces `samplers.ddim_sample`.

Given an initial latent x_init (e.g. the encoding of a low-resolution observation),
sampling may start part-way instead (SDEdit, Meng et al. 2022; CCDF, Chung et al.
2022): x at spaced step k0 is drawn from q(x_k0 | x_init) = N(sqrt(ab_k0) x_init,
(1 - ab_k0) I) with the noise the plain start would use, and only iterations
k0, k0 - 1, ..., 0 run.
"""

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infd_jax.diffusion import samplers, schedules, solvers
from infd_jax.diffusion.schedules import Schedule

PyTree = Any
LossFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # x0 -> (scalar, aux losses)


@dataclasses.dataclass(frozen=True)
class Refine:
  """How a guided iteration uses `loss_fn`. steps = 0: DPS, the DDIM update moves by minus
  the loss's gradient with respect to x_t (through the denoiser). steps > 0: data
  consistency as in DiffPIR (Zhu et al. 2023): the predicted x0 is refined by `steps`
  Adam steps of learning rate `lr` on the loss (no gradient through the denoiser), and

    x_{k-1} = sqrt(ab_prev) x0' + sqrt(1 - ab_prev) (sqrt(1 - zeta) e + sqrt(zeta) n),

  e = (x_t - sqrt(ab_k) x0') / sqrt(1 - ab_k) the noise x0' implies and n the fresh draw
  DDIM would use (zeta = 1: x0' re-noised afresh; 0: deterministic)."""
  steps: int = 0
  lr: float = 0.05
  zeta: float = 1.0


def guided_steps(num_steps: int, start: int = 0, stop: int = -1, every: int = 1) -> np.ndarray:
  """Bool [num_steps]: which sampler iterations (0 = the noisiest) are guided.

  Iterations start, start+every, ... before stop (stop -1 = num_steps).
  """
  stop = num_steps if stop < 0 else min(stop, num_steps)
  mask = np.zeros(num_steps, bool)
  mask[start:stop:every] = True
  return mask


def guided_ddim_sample(apply_fn: samplers.ApplyFn, params: PyTree, key: jax.Array,
                       shape: tuple[int, ...], sched: Schedule, loss_fn: LossFn, *,
                       num_steps: int, eta: float = 1.0, spacing: str = "uniform",
                       guide: Sequence[bool] | jax.Array | None = None,
                       init: jax.Array | None = None, init_step: int | jax.Array = -1,
                       refine: Refine = Refine()) -> tuple[jax.Array, jax.Array]:
  """DDIM from N(0, I) with guidance on the iterations where `guide` is True.

  Args:
    apply_fn, params, key, shape, sched, num_steps, eta, spacing: as
      `samplers.ddim_sample`.
    loss_fn: x0 [*shape] -> (scalar to descend, aux losses [n, B] to report).
    guide: bool [num_steps] per iteration (noisiest first), may be traced (one
      compilation serves guided and unguided runs); None guides all of them.
    init, init_step: start from init [*shape] noised to spaced step init_step
      (0 <= init_step < num_steps, may be traced) instead of from N(0, I); the
      iterations above init_step are skipped (their aux losses are zeros).
    refine: DPS (default) or data consistency on the guided iterations.

  Returns:
    (the final sample [*shape], the aux losses at each iteration [num_steps, n, B];
    zeros on unguided iterations).
  """
  guide = jnp.ones(num_steps, bool) if guide is None else jnp.asarray(guide, bool)
  if guide.shape != (num_steps,):
    raise ValueError(f"guide has {guide.shape} entries for {num_steps} steps")
  ts = samplers.spaced_timesteps(sched, num_steps, spacing)
  spaced = schedules.respace(sched, ts)
  ts = jnp.asarray(ts)
  x_init, key_loop = solvers.initial_noise(key, shape, None)
  _, aux_shape = jax.eval_shape(loss_fn, x_init)
  top = num_steps - 1
  if init is not None:
    top = jnp.asarray(init_step, jnp.int32)
    ab = spaced.alphas_cumprod_at(top)
    x_init = jnp.sqrt(ab) * init + jnp.sqrt(1 - ab) * x_init

  def step(x: jax.Array, k_and_guide: tuple[jax.Array, jax.Array]
           ) -> tuple[jax.Array, jax.Array]:
    k, guided_here = k_and_guide
    t = jnp.full((shape[0],), ts[k], dtype=jnp.int32)
    predict = lambda x: samplers.ddim_x0(spaced, k, x, apply_fn(params, x, t).astype(jnp.float32))

    def guided(x):
      def objective(x):
        x0 = predict(x)
        loss, aux = loss_fn(x0)
        return loss, (x0, aux)
      (_, (x0, aux)), grad = jax.value_and_grad(objective, has_aux=True)(x)
      return x0, aux, grad

    def fitted(x):
      x0 = predict(x)
      opt = optax.adam(refine.lr)

      def fit_step(carry, _):
        x0, state = carry
        grad = jax.grad(lambda x0: loss_fn(x0)[0])(x0)
        updates, state = opt.update(grad, state)
        return (optax.apply_updates(x0, updates), state), None
      (x0, _), _ = jax.lax.scan(fit_step, (x0, opt.init(x0)), None, length=refine.steps)
      ab, ab_prev = spaced.alphas_cumprod_at(k), spaced.alphas_cumprod_prev_at(k)
      e = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
      n = jax.random.normal(jax.random.fold_in(key_loop, k), x.shape, jnp.float32)
      noise = jnp.sqrt(1 - refine.zeta) * e + jnp.sqrt(refine.zeta) * n
      return jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1 - ab_prev) * noise, loss_fn(x0)[1]

    def plain(x):
      return predict(x), jnp.zeros(aux_shape.shape, aux_shape.dtype), jnp.zeros_like(x)

    def ddim(branch):
      def update(x):
        x0, aux, grad = branch(x)
        return samplers.ddim_update(spaced, k, x, x0, eta=eta, key=key_loop) - grad, aux
      return update

    def run(x):
      return jax.lax.cond(guided_here, fitted if refine.steps else ddim(guided), ddim(plain), x)

    skip = lambda x: (x, jnp.zeros(aux_shape.shape, aux_shape.dtype))
    return jax.lax.cond(k <= top, run, skip, x)

  return jax.lax.scan(step, x_init, (samplers.ddim_order(num_steps), guide))
