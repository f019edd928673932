"""Stage-2 latents cached under the workdir: written in shards by every process, read lazily.

Layout `<workdir>/latents/<key>/`: process p of P writes the latents of its
records (global indices p, p + P, ...) in files `p<p>-<file>.npy` of
`rows_per_file` rows, and process 0 writes `meta.json` once all are done, so a
cache without it is incomplete. `<key>` names the stage-1 step and a fingerprint
of the autoencoder's weights and settings: a changed autoencoder gets a new key.
Reading maps a global index to its file, keeping a few files in memory (local
files are memory-mapped), so host memory does not grow with the dataset.
"""

import functools
import io
import json
import os
from typing import Any, Iterator, Mapping

from etils import epath
import grain
import numpy as np

from infd_jax.data import pipeline

META = "meta.json"


def _file(directory: epath.Path, process: int, number: int) -> epath.Path:
  return directory / f"p{process:05d}-{number:06d}.npy"


def write_share(directory: epath.Path, latents: Iterator[np.ndarray], *, process_index: int,
                rows_per_file: int) -> int:
  """Writes this process's latents (its records in order, one array [n, h, w, c] at a time).

  Returns:
    The number of rows written.
  """
  directory.mkdir(parents=True, exist_ok=True)
  pending, rows, number = np.zeros((0,)), 0, 0

  def save(array: np.ndarray) -> None:
    nonlocal number
    with _file(directory, process_index, number).open("wb") as f:
      np.save(f, array)
    number += 1

  for z in latents:
    pending = np.concatenate([pending, z]) if len(pending) else z
    rows += len(z)
    while len(pending) >= rows_per_file:
      save(pending[:rows_per_file])
      pending = pending[rows_per_file:]
  if len(pending):
    save(pending)
  return rows


def write_meta(directory: epath.Path, **meta: Any) -> None:
  (directory / META).write_text(json.dumps(meta, sort_keys=True))


def read_meta(directory: epath.Path) -> dict[str, Any] | None:
  path = directory / META
  return json.loads(path.read_text()) if path.exists() else None


class LatentSource:
  """grain random-access source over a complete cache: index -> [h, w, c] float32."""

  def __init__(self, directory: str | os.PathLike, cached_files: int = 4):
    self._dir = epath.Path(directory)
    meta = read_meta(self._dir)
    if meta is None:
      raise FileNotFoundError(f"no complete latent cache in {self._dir}")
    self._n, self._writers = meta["num_records"], meta["process_count"]
    self._rows = meta["rows_per_file"]
    self._load = functools.lru_cache(maxsize=cached_files)(self._load_file)

  def _load_file(self, process: int, number: int) -> np.ndarray:
    path = _file(self._dir, process, number)
    if "://" not in os.fspath(path):
      return np.load(os.fspath(path), mmap_mode="r")
    return np.load(io.BytesIO(path.read_bytes()))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> np.ndarray:
    process, j = index % self._writers, index // self._writers
    return np.asarray(self._load(process, j // self._rows)[j % self._rows], np.float32)

  def __getstate__(self):  # grain worker processes re-open the files
    return {"directory": os.fspath(self._dir)}

  def __setstate__(self, state):
    self.__init__(state["directory"])


def latent_std(directory: str | os.PathLike) -> float:
  """Standard deviation of every value of a complete cache (float64 sums, one pass)."""
  source = LatentSource(directory)
  total = total_sq = 0.0
  for i in range(len(source)):
    z = source[i].astype(np.float64)
    total, total_sq = total + z.sum(), total_sq + np.square(z).sum()
  count = len(source) * source[0].size
  mean = total / count
  return float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))


def latent_dataset(directory: str | os.PathLike, *, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   data: Mapping[str, Any] | None = None) -> grain.IterDataset:
  """Batches {"z": [B, h, w, c]} in one seeded global order (see `pipeline.batched`).

  Args:
    directory: a complete cache (`meta.json` present).
    global_batch_size: batch over all processes.
    seed: shuffle seed.
    process_index: this process.
    process_count: number of processes.
    data: pipeline keys (read_threads, ...); shuffling and endless repetition are fixed.
  """
  source = LatentSource(directory)
  if len(source) < global_batch_size:
    raise ValueError(f"only {len(source)} cached latents for a global batch of "
                     f"{global_batch_size}")
  cfg = {k: v for k, v in (data or {}).items() if k in ("read_threads",)}
  cfg |= dict(shuffle=True, num_epochs=None, num_workers=0)
  return pipeline.batched(grain.MapDataset.source(source), lambda z, rng: {"z": z}, cfg,
                          global_batch_size=global_batch_size, seed=seed,
                          process_index=process_index, process_count=process_count)
