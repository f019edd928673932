"""Optimizers of both stages (REFERENCE.md 4.5 and 6.4): no schedule, no clipping.

`optim.cosine_decay` (demo-only; False, the default, is the official constant rate)
decays each stage's learning rate to 0 along a half cosine over its `steps`.
"""

import jax
import ml_collections
import optax


def _rate(optim: ml_collections.ConfigDict, lr: float, steps: int) -> float | optax.Schedule:
  return optax.cosine_decay_schedule(lr, steps) if optim.cosine_decay and steps > 0 else lr


def ae_optimizer(optim: ml_collections.ConfigDict, steps: int = 0) -> optax.GradientTransformation:
  """Adam(lr 3.6e-5, betas (0.5, 0.9), eps 1e-8), no weight decay; used for G and D."""
  return optax.adam(_rate(optim, optim.ae_lr, steps), b1=optim.ae_b1, b2=optim.ae_b2, eps=1e-8)


def frozen_parts(tx: optax.GradientTransformation,
                 frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """`tx` on every parameter except the top-level subtrees named in `frozen`, which get no
  update at all (their optimizer state is empty), so they stay bit-identical."""
  if not frozen:
    return tx
  labels = lambda params: {k: jax.tree.map(lambda _: "frozen" if k in frozen else "train", v)
                           for k, v in params.items()}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def dm_optimizer(optim: ml_collections.ConfigDict, steps: int = 0) -> optax.GradientTransformation:
  """PyTorch AdamW: decoupled decay lr*wd*p on every parameter, betas (0.9, 0.999)."""
  return optax.adamw(_rate(optim, optim.dm_lr, steps), b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=optim.dm_weight_decay)
