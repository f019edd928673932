"""PatchGAN discriminator (pix2pix `NLayerDiscriminator`, ndf 64, 3 layers, BatchNorm).

Naming rule: `disc.main.<i>` -> `main_<i>` with the Sequential index kept, so
the convs are `main_0, main_2, main_5, main_8, main_11` and the BatchNorms
`main_3, main_6, main_9` (params `scale`/`bias` from `weight`/`bias`,
batch_stats `mean`/`var` from `running_mean`/`running_var`;
`num_batches_tracked` is dropped).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from infd_jax.models import layers

Dtype = Any


def _normal_around(mean: float, std: float) -> nn.initializers.Initializer:
  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)
  return init


class BatchNorm(nn.Module):
  """BatchNorm over all but the channel axis, with PyTorch's running-stat rule.

  In training it normalises with the biased batch variance but folds the
  *unbiased* one into the running variance, as torch.nn.BatchNorm2d does.
  Statistics are means over the whole (global) batch: under jit with a
  batch-sharded input, XLA reduces across devices, as SyncBatchNorm does.

  Attributes:
    momentum: PyTorch convention, running = (1 - momentum) * running + momentum * batch.
    epsilon: added to the variance.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """[..., C] -> [..., C]; updates `batch_stats` when train (apply with mutable)."""
    c, full = x.shape[-1], layers.full_precision(self.dtype)
    scale = self.param("scale", nn.with_logical_partitioning(_normal_around(1.0, 0.02), ("norm",)),
                       (c,), full)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (c,), full)
    stat = lambda init: nn.with_logical_partitioning(init, ("norm",))(None, (c,), full)
    ra_mean = self.variable("batch_stats", "mean", stat, nn.initializers.zeros)
    ra_var = self.variable("batch_stats", "var", stat, nn.initializers.ones)
    xf = x.astype(full)
    axes = tuple(range(x.ndim - 1))
    if train:
      mean = jnp.mean(xf, axis=axes)
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
      if not self.is_initializing():
        n = x.size // c
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
        ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


class PatchDiscriminator(nn.Module):
  """[B, H, W, 3] -> patch logits [B, H/8 - 2, W/8 - 2, 1] in full precision (30x30 for
  256).

  All convs are k4 with symmetric pad 1 (explicit: 'SAME' would differ for the
  stride-1 layers); strides 2, 2, 2, 1, 1. Conv kernels ~ N(0, 0.02), the two
  biased convs keep PyTorch's default bias init, BN scale ~ N(1, 0.02).
  """
  ndf: int = 64
  n_layers: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    pad = ((1, 1), (1, 1))
    kinit = nn.initializers.normal(0.02)
    conv = lambda feats, stride, bias, idx, c_in: layers.conv(
        feats, 4, in_features=c_in, strides=stride, padding=pad, use_bias=bias,
        dtype=self.dtype, kernel_init=kinit, name=f"main_{idx}")
    h = nn.leaky_relu(conv(self.ndf, 2, True, 0, x.shape[-1])(x), 0.2)
    idx, c = 2, self.ndf
    for n in range(1, self.n_layers + 1):
      feats = self.ndf * min(2 ** n, 8)
      h = conv(feats, 2 if n < self.n_layers else 1, False, idx, c)(h)
      h = BatchNorm(dtype=self.dtype, name=f"main_{idx + 1}")(h, train)
      h = nn.leaky_relu(h, 0.2)
      idx, c = idx + 3, feats
    return conv(1, 1, True, idx, c)(h).astype(layers.full_precision(self.dtype))
