"""An ordered, bounded parallel map for the host-side image work (decode, resize)."""

import collections
import concurrent.futures
import multiprocessing
from typing import Callable, Iterable, Iterator, TypeVar

_T = TypeVar("_T")
_R = TypeVar("_R")


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T],
                pool: concurrent.futures.Executor | None, ahead: int) -> Iterator[_R]:
  """`map(fn, items)` run on `pool`, yielded in input order, at most `ahead` results pending.

  With `pool=None` it is plain `map` in this thread.
  """
  if pool is None:
    yield from map(fn, items)
    return
  pending = collections.deque()
  for item in items:
    pending.append(pool.submit(fn, item))
    if len(pending) >= ahead:
      yield pending.popleft().result()
  while pending:
    yield pending.popleft().result()


def spawn_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """Worker processes that are spawned, not forked: safe beside JAX's threads.

  Functions sent to them must be picklable (module-level functions or partials).
  """
  return concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"))
