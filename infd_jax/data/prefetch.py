"""Device prefetch: the next batches are copied to the devices while the current step runs."""

import collections
import json
from typing import Any, Callable, Iterator

PyTree = Any


class DevicePrefetch:
  """Iterator of device batches that keeps `size` more batches in flight.

  Each `next()` hands out a batch that was put on the devices earlier and
  starts the copy of a later one; jax dispatches both asynchronously, so the
  copy and the host-side reading overlap the steps still running. The position
  it reports (`get_state`, `set_state`, the interface grain's orbax
  `CheckpointHandler` uses for iterators) is the one after the last batch
  handed out, not after the ones read ahead, so a resumed run sees every batch
  once.

  Attributes:
    iterator: a grain iterator of host batches (`get_state` / `set_state`).
    put: host batch -> device batch, e.g. `lambda b: sharding.shard_batch(b, mesh)`.
    size: batches in flight besides the one handed out (2 as flax's prefetch_to_device).
  """

  def __init__(self, iterator: Iterator[PyTree], put: Callable[[PyTree], PyTree], size: int = 2):
    self._it, self._put, self._size = iterator, put, size
    self._buffer = collections.deque()  # (device batch, iterator state after it)
    self._state = None  # iterator state after the last batch handed out

  def __iter__(self) -> "DevicePrefetch":
    return self

  def __next__(self) -> PyTree:
    while len(self._buffer) <= self._size:
      try:
        host = next(self._it)
      except StopIteration:
        break
      self._buffer.append((self._put(host), self._it.get_state()))
    if not self._buffer:
      raise StopIteration
    batch, self._state = self._buffer.popleft()
    return batch

  def get_state(self) -> bytes:
    """JSON of the wrapped iterator's state after the last batch handed out."""
    state = self._it.get_state() if self._state is None else self._state
    return json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    self._it.set_state(json.loads(state))
    self._buffer.clear()
    self._state = None

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore; reading starts on next()."""
