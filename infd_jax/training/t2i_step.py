"""Text-to-image UNet training step (the paper's section 5 fine-tuning of SD's UNet).

The frozen KL encoder turns images into latents (posterior mean times the
latent scale), the frozen text tower turns token ids into the context; a
fraction `uncond_prob` of the captions is replaced by the empty caption so that
the same UNet also learns the unconditional model classifier-free guidance
needs. The loss is the eps or v MSE (`prediction`), AdamW updates the UNet and
an EMA follows it. Only the UNet is in the state: frozen parts are arguments,
so they cannot change.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from infd_jax.diffusion import gaussian, prediction
from infd_jax.diffusion.schedules import Schedule
from infd_jax.training import dm_step
from infd_jax.training.state import DMState

PyTree = Any


def latents(vae: nn.Module, vae_params: PyTree, images: jax.Array, scale: float) -> jax.Array:
  """scale * posterior mean [B, H/8, W/8, 4] of images [B, H, W, 3] in [-1, 1], no gradient."""
  mean, _ = vae.apply({"params": vae_params}, images, method="encode")
  return jax.lax.stop_gradient(mean * scale)


def t2i_train_step(state: DMState, batch: dict[str, jax.Array], frozen: dict[str, PyTree], *,
                   unet: nn.Module, vae: nn.Module, text: nn.Module,
                   tx: optax.GradientTransformation, sched: Schedule, objective: str,
                   latent_scale: float, uncond_prob: float, ema_decay: float,
                   skip_nonfinite: bool = False) -> tuple[DMState, dict[str, jax.Array]]:
  """One step on a global batch.

  Args:
    state: the UNet's `DMState`.
    batch: `tokens` [B, L] int32 and either `image` [B, H, W, 3] in [-1, 1]
      (encoded here) or `z` [B, h, w, 4] (already scaled latents).
    frozen: {'vae': KLAutoencoder params (unused with `z`), 'text':
      TextTransformer params, 'empty_tokens': [1, L] the empty caption's ids}.
    unet, vae, text: the modules; tx: the optimizer; sched: the training schedule.
    objective: "eps" or "v", what the UNet predicts.
    latent_scale: SD's scaling factor of the latents.
    uncond_prob: probability of training a caption as the empty one.
    ema_decay: EMA decay per step.
    skip_nonfinite: a step with a non-finite loss leaves the state unchanged.

  Returns:
    (new state, {"loss", "grad_norm"}).
  """
  if objective not in prediction.PREDICTIONS:
    raise ValueError(f"unknown objective {objective!r}; use one of {prediction.PREDICTIONS}")
  z0 = batch["z"] if "z" in batch else latents(vae, frozen["vae"], batch["image"], latent_scale)
  z0 = z0.astype(jnp.float32)
  k_t, k_eps, k_drop = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
  encode = lambda tokens: text.apply({"params": frozen["text"]}, tokens)
  context = jax.lax.stop_gradient(encode(batch["tokens"]))
  empty = jax.lax.stop_gradient(encode(frozen["empty_tokens"]))
  drop = jax.random.bernoulli(k_drop, uncond_prob, (z0.shape[0], 1, 1))
  context = jnp.where(drop, empty, context)
  t = jax.random.randint(k_t, (z0.shape[0],), 0, sched.num_steps)
  eps = jax.random.normal(k_eps, z0.shape, jnp.float32)
  x_t = gaussian.q_sample(sched, z0, t, eps)
  target = eps if objective == "eps" else prediction.v_target(sched, z0, t, eps)

  def loss_fn(params):
    out = unet.apply({"params": params}, x_t, t, context).astype(jnp.float32)
    return jnp.mean(jnp.square(out - target))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return (dm_step.update_with_ema(state, loss, grads, tx, ema_decay, skip_nonfinite),
          {"loss": loss, "grad_norm": optax.global_norm(grads)})
