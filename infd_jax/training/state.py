"""Training states of both stages: plain pytrees, checkpointed whole by orbax."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class AEState:
  """Stage 1: generator (encoder, quantizer, decoder, renderer) and discriminator.

  The four official Adam optimizers share one set of hyper-parameters, and Adam is
  element-wise, so one optimizer over the generator tree is the same update as
  the official encoder/decoder(+quantizer)/renderer groups.
  """
  step: jax.Array
  gen_params: PyTree
  disc_params: PyTree
  disc_stats: PyTree          # discriminator BatchNorm running statistics
  gen_opt: optax.OptState
  disc_opt: optax.OptState
  rng: jax.Array              # root key; per-step keys are fold_in(rng, step)


@flax.struct.dataclass
class DMState:
  """Stage 2: UNet parameters, their EMA and the AdamW state."""
  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt: optax.OptState
  rng: jax.Array


def select(cond: jax.Array, new: PyTree, old: PyTree) -> PyTree:
  """Leaf-wise `new if cond else old` inside a jitted step (no host sync)."""
  return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def skip_unless_finite(finite: jax.Array, new_state, old_state):
  """The new state, or the old one with only the step counter advanced."""
  return select(finite, new_state, old_state.replace(step=old_state.step + 1))
