"""Stage-2 training step (REFERENCE.md 6.2, 6.4): epsilon-MSE, AdamW, EMA 0.9999.

The loss, gradients and updates are in the UNet's full precision
(`layers.full_precision`): float32, or float64 for a float64 compute dtype (x64).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from infd_jax.diffusion import gaussian
from infd_jax.diffusion.schedules import Schedule
from infd_jax.models import layers
from infd_jax.training.state import DMState, skip_unless_finite

PyTree = Any


def encode_latents(ae: nn.Module, ae_params: PyTree, images: jax.Array) -> jax.Array:
  """The frozen encoder's pre-quantization latent z [B, h, w, 3] (full precision, unscaled)."""
  z = ae.apply({"params": ae_params}, images, method="encode")
  return jax.lax.stop_gradient(z.astype(layers.full_precision(ae.dtype)))


def dm_train_step(state: DMState, batch: dict[str, jax.Array], ae_params: PyTree | None, *,
                  unet: nn.Module, ae: nn.Module, tx: optax.GradientTransformation,
                  sched: Schedule, ema_decay: float, latent_scale: float = 1.0,
                  skip_nonfinite: bool = False) -> tuple[DMState, dict[str, jax.Array]]:
  """One DDPM step on a global batch.

  Args:
    state: the current `DMState`.
    batch: either `z` [B,h,w,3] (cached latents) or `inp` [B,R,R,3] images,
      which the frozen encoder turns into z inside the step; optionally `t` [B]
      and `eps` (shaped like z) to replay a recorded step instead of drawing them.
    ae_params: the frozen stage-1 parameters (unused when the batch carries `z`).
    unet, ae: modules; tx: AdamW; sched: the diffusion tables; ema_decay: 0.9999.
    latent_scale: the UNet learns the distribution of latent_scale * z (1.0: official).
    skip_nonfinite: if True, a step with a non-finite loss leaves the state unchanged.

  Returns:
    (new state, scalar metrics).
  """
  z0 = batch["z"] if "z" in batch else encode_latents(ae, ae_params, batch["inp"])
  if latent_scale != 1.0:
    z0 = z0 * latent_scale
  k_t, k_eps = jax.random.split(jax.random.fold_in(state.rng, state.step))
  t, eps = ((batch["t"], batch["eps"]) if "t" in batch
            else gaussian.draw_t_eps(k_t, k_eps, z0, sched))

  def loss_fn(params):
    apply_fn = lambda p, x, t: unet.apply({"params": p}, x, t)
    return jnp.mean(gaussian.eps_loss_at(apply_fn, params, z0, t, eps, sched))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return (update_with_ema(state, loss, grads, tx, ema_decay, skip_nonfinite),
          {"z_dm_loss": loss, "grad_norm": optax.global_norm(grads)})


def update_with_ema(state: DMState, loss: jax.Array, grads: PyTree,
                    tx: optax.GradientTransformation, ema_decay: float,
                    skip_nonfinite: bool) -> DMState:
  """The optimizer step on `grads`, then the EMA of the new parameters; with
  `skip_nonfinite`, a non-finite `loss` leaves the state unchanged."""
  updates, opt = tx.update(grads, state.opt, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt=opt)
  if skip_nonfinite:
    new_state = skip_unless_finite(jnp.isfinite(loss), new_state, state)
  return new_state
