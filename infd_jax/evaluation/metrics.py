"""Training/eval metric collections (clu) and the PSNR / codebook-usage formulas.

A step returns a dict of values computed on the global (sharded) batch, so they
are already global; `Collection.single_from_model_output(**values)` inside the
jitted step then needs no cross-device gather. Scalars count once per step,
per-example arrays [B] once per example, and `merge` weighs by those counts.
"""

import jax
import jax.numpy as jnp
from clu import metrics


def _averages(*names: str) -> type[metrics.Collection]:
  return metrics.Collection.create(**{n: metrics.Average.from_output(n) for n in names})


# Keys logged by the official AE trainer (REFERENCE.md 4.7) plus codebook usage.
AETrainMetrics = _averages(
    "loss", "quant_loss", "l1_loss", "perc_loss", "gan_g_loss", "adaptive_g_w", "psnr",
    "disc_loss", "disc_logits_real", "disc_logits_fake", "codebook_perplexity",
    "codebook_usage")
# Eval runs the generator losses only (no discriminator update); w is fixed there.
AEEvalMetrics = _averages(
    "loss", "quant_loss", "l1_loss", "perc_loss", "gan_g_loss", "psnr",
    "codebook_perplexity", "codebook_usage")
DMTrainMetrics = _averages("z_dm_loss", "grad_norm")
T2ITrainMetrics = _averages("loss", "grad_norm")  # SD's UNet fine-tuned on captions
# The official DM eval selects best-model.pth on z_dm_ema_loss.
DMEvalMetrics = _averages("z_dm_loss", "z_dm_ema_loss")


def psnr(pred: jax.Array, gt: jax.Array) -> jax.Array:
  """PSNR on the [0, 1] scale of images given in [-1, 1].

  Args:
    pred, gt: [B, H, W, C] in [-1, 1].

  Returns:
    [B] float32: -10 log10(mean_hwc(((gt - pred) / 2)^2)); +inf where equal.
  """
  err = (gt.astype(jnp.float32) - pred.astype(jnp.float32)) / 2.0
  return -10.0 * jnp.log10(jnp.mean(jnp.square(err), axis=(1, 2, 3)))


def codebook_usage(indices: jax.Array, codebook_size: int,
                   mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """How evenly a batch of VQ code indices uses the codebook.

  Args:
    indices: int array of any shape (e.g. [B, h, w]) with values in [0, K).
    codebook_size: K.
    mask: optional [B] bool; codes of examples where it is False are not counted.

  Returns:
    {'perplexity': exp(entropy of the code histogram), in [1, K];
     'fraction_used': share of the K codes that occur at least once}.
  """
  weights = None if mask is None else jnp.broadcast_to(
      mask.reshape(mask.shape + (1,) * (indices.ndim - 1)).astype(jnp.float32),
      indices.shape).reshape(-1)
  counts = jnp.bincount(indices.reshape(-1), weights, length=codebook_size).astype(jnp.float32)
  p = counts / jnp.sum(counts)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"perplexity": jnp.exp(entropy),
          "fraction_used": jnp.mean((counts > 0).astype(jnp.float32))}
