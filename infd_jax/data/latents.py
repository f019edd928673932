"""A grain pipeline over latents cached as one numpy array per process."""

import grain
import numpy as np


def latent_dataset(latents: np.ndarray, *, local_batch_size: int, seed: int) -> grain.IterDataset:
  """Seeded shuffle -> repeat -> batch of {"z": [B, h, w, c]}; checkpointable like any grain iterator.

  Args:
    latents: this process's cached latents [N, h, w, c] (its own share of the data).
    local_batch_size: examples per batch on this process.
    seed: shuffle seed.
  """
  if len(latents) < local_batch_size:
    raise ValueError(f"only {len(latents)} cached latents for a local batch of {local_batch_size}")
  ds = grain.MapDataset.source(latents).seed(seed).shuffle().repeat()
  ds = ds.map(lambda z: {"z": np.asarray(z, np.float32)})
  return ds.batch(local_batch_size, drop_remainder=True).to_iter_dataset()
