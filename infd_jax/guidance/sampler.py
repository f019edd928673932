"""DDIM with DPS-style guidance (Chung et al. 2023): no training, any differentiable loss.

Each DDIM step k predicts eps and x0 = sqrt(1/ab_k) x - sqrt(1/ab_k - 1) eps from
x_t; on the guided steps it also evaluates `loss_fn(x0)` and moves the DDIM
update by minus its gradient with respect to x_t (through the denoiser):

  x_{k-1} = DDIM(x_t, eps) - grad_{x_t} loss_fn(x0(x_t)).

`loss_fn` carries the per-condition scales (`conditions.Objective.weighted`).
The DDIM part is `infd_jax.diffusion.samplers`' own (`ddim_x0`, `ddim_update`,
the same time-step spacings and noise draws from the key), so guidance off
reproduces `samplers.ddim_sample`.
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infd_jax.diffusion import samplers, schedules, solvers
from infd_jax.diffusion.schedules import Schedule

PyTree = Any
LossFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # x0 -> (scalar, aux losses)


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
                       guide: Sequence[bool] | jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """DDIM from N(0, I) with guidance on the iterations where `guide` is True.

  Args:
    apply_fn, params, key, shape, sched, num_steps, eta, spacing: as
      `samplers.ddim_sample`.
    loss_fn: x0 [*shape] -> (scalar to descend, aux losses [n, B] to report).
    guide: bool [num_steps] per iteration (noisiest first), may be traced (one
      compilation serves guided and unguided runs); None guides all of them.

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

    def plain(x):
      return predict(x), jnp.zeros(aux_shape.shape, aux_shape.dtype), jnp.zeros_like(x)

    x0, aux, grad = jax.lax.cond(guided_here, guided, plain, x)
    return samplers.ddim_update(spaced, k, x, x0, eta=eta, key=key_loop) - grad, aux

  return jax.lax.scan(step, x_init, (samplers.ddim_order(num_steps), guide))
