"""Host-consistent passes over a finite split: same batch count on every host, padded, masked.

A jitted call over global arrays must run the same number of times on every
process, but record shares differ by one when the count does not divide. Here
each process takes records[process_index::process_count], groups them into
`num_batches(...)` batches of `local_batch` (the same number on every host),
and pads the tail with copies of a real example whose `_mask` is False, so a
masked reduction counts each record exactly once (as big_vision pads its
inference batches).
"""

import itertools
from typing import Iterable, Iterator, Mapping

import numpy as np

MASK = "_mask"


def num_batches(num_records: int, process_count: int, local_batch: int) -> int:
  """Batches every process runs: enough for the largest share, ceil(ceil(n / P) / b)."""
  largest_share = -(-num_records // process_count)
  return -(-largest_share // local_batch)


def share(num_records: int, process_index: int, process_count: int) -> range:
  """Global indices of this process's records."""
  return range(process_index, num_records, process_count)


def padded_batches(examples: Iterable[Mapping[str, np.ndarray]], *, local_batch: int,
                   count: int) -> Iterator[dict[str, np.ndarray]]:
  """Exactly `count` batches of `local_batch` examples, each with a bool `_mask` [local_batch].

  Args:
    examples: this process's examples (dicts of arrays), at most count * local_batch.
    local_batch: rows per batch.
    count: batches to yield (from `num_batches`); padding-only batches come last.
  """
  it = iter(examples)
  filler = None
  for _ in range(count):
    rows = list(itertools.islice(it, local_batch))
    if rows:
      filler = rows[0]
    if filler is None:  # this host has no record at all: any example shape will do
      raise ValueError("padded_batches needs at least one example on every process")
    mask = np.arange(local_batch) < len(rows)
    rows += [filler] * (local_batch - len(rows))
    batch = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
    batch[MASK] = mask
    yield batch
  if next(it, None) is not None:
    raise ValueError(f"more than {count} x {local_batch} examples on this process")
