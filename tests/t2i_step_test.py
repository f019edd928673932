"""The text-to-image UNet step fine-tunes the imported tiny SD 1.x model on a fixed batch."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from infd_jax.clip.text import TextTransformer
from infd_jax.convert import sd
from infd_jax.diffusion import schedules
from infd_jax.models.sd_unet import SDUNet
from infd_jax.models.sd_vae import KLAutoencoder
from infd_jax.training import t2i_step
from infd_jax.training.state import DMState

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd" / "sd1"


def test_loss_decreases_and_frozen_parts_stay_bit_identical():
  objective = "v"  # eps differs only in its target (diffusion_test / sd_parity_test)
  trees, arch = sd.read(FIXTURE)
  unet, vae = SDUNet(**arch["unet"]), KLAutoencoder(**arch["vae"])
  text = TextTransformer(**arch["text"])
  tx = optax.adam(3e-3)
  frozen = dict(vae=trees["vae"], text=trees["text"],
                empty_tokens=jnp.asarray([[98, 99] + [99] * 6], jnp.int32))
  frozen_before = jax.tree.map(np.array, frozen)
  rng = np.random.default_rng(0)
  batch = dict(image=jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 3)), jnp.float32),
               tokens=jnp.asarray(rng.integers(1, 98, (4, 8)), jnp.int32))
  state = DMState(step=jnp.zeros((), jnp.int32), params=trees["unet"],
                  ema_params=trees["unet"], opt=tx.init(trees["unet"]),
                  rng=jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(
      t2i_step.t2i_train_step, unet=unet, vae=vae, text=text, tx=tx,
      sched=schedules.scaled_linear_schedule(), objective=objective, latent_scale=0.18215,
      uncond_prob=0.25, ema_decay=0.9))
  # The same (t, eps) draws every step: fold_in(rng, step) with the step reset keeps them fixed,
  # so the loss measures fitting one noisy batch.
  losses = []
  for _ in range(12):
    state, metrics = step(state.replace(step=jnp.zeros((), jnp.int32)), batch, frozen)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(np.asarray(a), b)
  moved = jax.tree.leaves(jax.tree.map(lambda e, p: float(jnp.max(jnp.abs(e - p))),
                                       state.ema_params, trees["unet"]))
  assert max(moved) > 0
