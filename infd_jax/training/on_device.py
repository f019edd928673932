"""The device half of the stage-1 input pipeline (jnp, called inside the jitted step).

Host batches carry uint8 images and each example's crop (r, ii, jj)
(`transforms.AeTransform`); the float images and the query grids are made here,
equal bit for bit to the host formulas (`transforms.to_float`, `patch_coord`,
`patch_cell`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from infd_jax.data import transforms
from infd_jax.rendering import coords


# The 256 values of `transforms.to_float`. A table, not `x * (2/255) - 1` on the
# device, where XLA may fuse the two into one FMA and round once instead of twice.
_LEVELS = transforms.to_float(np.arange(256, dtype=np.uint8))


def to_float(images: jax.Array) -> jax.Array:
  """uint8 images -> float32 in [-1, 1], equal to `transforms.to_float` on the host."""
  return jnp.take(jnp.asarray(_LEVELS), images.astype(jnp.int32), axis=0)


def ae_batch(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """{inp, gt uint8, crop [B, 3]} -> {inp, gt float32, coord, cell [B, P, P, 2]}."""
  coord, cell = coords.crop_coord_cell(batch["crop"], batch["gt"].shape[1])
  return {"inp": to_float(batch["inp"]), "gt": to_float(batch["gt"]), "coord": coord,
          "cell": cell}
