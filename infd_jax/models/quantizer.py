"""Vector quantizer of the INFD autoencoder (taming `VectorQuantizer`, legacy loss).

Naming rule: `quantizer.embedding.weight` (N, D) is the param `embedding` of
this module, stored as is (no transpose).

All quantizer math runs in `dtype`, float32 whatever the autoencoder's compute
dtype (float64 only in x64 mode for a float64 one), because the argmin over 8192
nearly equal distances is sensitive to rounding.
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Dtype = Any

@flax.struct.dataclass
class VQOutput:
  """z_q: [B, h, w, D] straight-through output; loss: scalar; indices: [B, h, w] int32."""
  z_q: jax.Array
  loss: jax.Array
  indices: jax.Array


def nearest_code(z: jax.Array, codebook: jax.Array, chunk: int = 1024) -> jax.Array:
  """Index of the nearest code per vector, by the expanded squared distance.

  The codebook is scanned in chunks of `chunk` codes with a running minimum, so
  the distances alive at once are [..., chunk], not [..., N]. A later chunk
  replaces the running best only when strictly closer, so ties go to the lowest
  index over the whole codebook, as one argmin (and torch.argmin) does.

  Args:
    z: [..., D] float32 vectors.
    codebook: [N, D] float32 codes.
    chunk: codes per step (N itself when it does not divide N).

  Returns:
    [...] int32 indices.
  """
  z = jax.lax.stop_gradient(z)
  n = codebook.shape[0]
  chunk = chunk if n % chunk == 0 else n
  z_sq = jnp.sum(z ** 2, axis=-1, keepdims=True)

  def step(best, start):
    codes = jax.lax.dynamic_slice_in_dim(codebook, start, chunk)
    # |z|^2 + |e|^2 - 2 z.e, the same expansion as the official code; near-ties can
    # resolve differently from an exact |z - e|, so the form matters.
    dist = (z_sq + jnp.sum(codes ** 2, axis=-1)
            - 2.0 * jnp.einsum("...d,nd->...n", z, codes, precision=jax.lax.Precision.HIGHEST))
    d, i = jnp.min(dist, axis=-1), jnp.argmin(dist, axis=-1).astype(jnp.int32) + start
    better = d < best[0]
    return (jnp.where(better, d, best[0]), jnp.where(better, i, best[1])), None

  init = (jnp.full(z.shape[:-1], jnp.inf, z.dtype), jnp.zeros(z.shape[:-1], jnp.int32))
  (_, index), _ = jax.lax.scan(step, init, jnp.arange(0, n, chunk, dtype=jnp.int32))
  return index


def vq_loss(z: jax.Array, z_q: jax.Array, beta: float) -> jax.Array:
  """Legacy taming loss: mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)."""
  sg = jax.lax.stop_gradient
  return jnp.mean((sg(z_q) - z) ** 2) + beta * jnp.mean((z_q - sg(z)) ** 2)


class VectorQuantizer(nn.Module):
  """Nearest-code quantizer with a straight-through estimator.

  Attributes:
    num_codes: codebook size N (8192).
    code_dim: code dimension D (3, the latent channels).
    beta: weight of the codebook term in the legacy loss (0.25).
    init_bound: codes start uniform in (-b, b); 0 means the official b = 1/N.
      The official bound is far below the encoder's output scale, so at first
      only the few codes at the corners of the codebook's cloud are ever
      nearest; a short run (the demo) uses a bound near that scale instead.
  """
  num_codes: int = 8192
  code_dim: int = 3
  beta: float = 0.25
  init_bound: float = 0.0
  dtype: Dtype = jnp.float32  # of the codebook and all quantizer math: float32 or float64

  def setup(self):
    bound = self.init_bound or 1.0 / self.num_codes

    def init(key, shape, dtype=jnp.float32):
      return jax.random.uniform(key, shape, dtype, -bound, bound)

    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(init, ("codes", "code_dim")),
        (self.num_codes, self.code_dim), self.dtype)

  def __call__(self, z: jax.Array) -> VQOutput:
    """Quantizes z [B, h, w, D]; gradients reach z unchanged through z_q."""
    z = z.astype(self.dtype)
    indices = nearest_code(z, self.embedding)
    z_q = self.lookup(indices)
    loss = vq_loss(z, z_q, self.beta)
    z_st = z + jax.lax.stop_gradient(z_q - z)
    return VQOutput(z_q=z_st, loss=loss, indices=indices)

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Codes for integer indices: [...] -> [..., D] float32."""
    return jnp.take(self.embedding, indices, axis=0)
