"""Concurrent window requests -> few render calls, on one render thread.

Requests that arrive while the renderer is busy (or within `linger_s` of each
other) form one batch. Windows of the same image at the same level are covered by
bounding windows (`plan`): neighbouring tiles of a viewer's screen become one
`render` call, whose tiled render equals each tile rendered alone. All rendering
(tiles and saved views) runs on a single thread, so the model sees one call at a
time; at most `max_pending` windows wait, beyond that requests are refused
(`Busy`), which bounds the memory queued requests can take.
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from infd_jax.view.dzi import Window
from infd_jax.view.sources import ImageRef

RenderFn = Callable[[ImageRef, tuple[int, int], Window], np.ndarray]


class Busy(RuntimeError):
  """Too many requests waiting (answered 503)."""


@dataclasses.dataclass(frozen=True)
class Job:
  """One window of one image shown at level_hw."""
  ref: ImageRef
  level_hw: tuple[int, int]
  window: Window


def _area(window: Window) -> int:
  return window[2] * window[3]


def _bounds(windows: Sequence[Window]) -> Window:
  top, left = min(w[0] for w in windows), min(w[1] for w in windows)
  bottom, right = max(w[0] + w[2] for w in windows), max(w[1] + w[3] for w in windows)
  return top, left, bottom - top, right - left


def plan(windows: Sequence[Window], max_pixels: int, max_waste: float = 2.0
         ) -> list[tuple[Window, list[int]]]:
  """Covers windows with bounding windows, each rendered once.

  A group's bounding window has at most `max_pixels` pixels and at most
  `max_waste` times the pixels of its windows, else the group is split in two at
  the median along the longer side; a single window is always its own group.

  Returns:
    [(bounding window, indices of the windows inside it)], every index once.
  """
  out: list[tuple[Window, list[int]]] = []

  def split(indices: list[int]) -> None:
    box = _bounds([windows[i] for i in indices])
    needed = sum(_area(windows[i]) for i in indices)
    if len(indices) == 1 or (_area(box) <= max_pixels and _area(box) <= max_waste * needed):
      out.append((box, indices))
      return
    axis = 0 if box[2] >= box[3] else 1
    indices = sorted(indices, key=lambda i: 2 * windows[i][axis] + windows[i][axis + 2])
    half = len(indices) // 2
    split(indices[:half])
    split(indices[half:])

  if windows:
    split(list(range(len(windows))))
  return out


class Batcher:
  """Renders Jobs in batches on one thread; `await render(job)` -> uint8 [h, w, 3].

  Args:
    render: the source's `(ref, level_hw, window) -> uint8 [h, w, 3]`.
    max_pending: jobs allowed to wait; more raise Busy.
    max_pixels, max_waste: bounds of one bounding window (see `plan`).
    linger_s: how long the first job of a batch waits for others.
  """

  def __init__(self, render: RenderFn, *, max_pending: int = 4096, max_pixels: int = 1 << 22,
               max_waste: float = 2.0, linger_s: float = 0.005):
    self._render = render
    self.max_pending, self.max_pixels, self.max_waste = max_pending, max_pixels, max_waste
    self.linger_s = linger_s
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="infd-render")
    self._queue: asyncio.Queue | None = None
    self._worker: asyncio.Task | None = None
    self.pending = 0
    self.stats = collections.Counter()  # batches, render_calls, jobs, errors

  async def start(self) -> None:
    self._queue = asyncio.Queue()
    self._worker = asyncio.create_task(self._run())

  async def stop(self) -> None:
    if self._worker is not None:
      self._worker.cancel()
      await asyncio.gather(self._worker, return_exceptions=True)
    self._executor.shutdown(wait=True, cancel_futures=True)

  async def render(self, job: Job) -> np.ndarray:
    if self.pending >= self.max_pending:
      raise Busy(f"{self.pending} windows are waiting to be rendered; try again")
    future = asyncio.get_running_loop().create_future()
    self.pending += 1
    try:
      self._queue.put_nowait((job, future))
      return await future
    finally:
      self.pending -= 1

  async def run(self, fn: Callable[[], Any]) -> Any:
    """Runs fn on the render thread, between batches (e.g. a saved view)."""
    return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

  async def _run(self) -> None:
    while True:
      batch = [await self._queue.get()]
      await asyncio.sleep(self.linger_s)
      while not self._queue.empty():
        batch.append(self._queue.get_nowait())
      batch = [(job, f) for job, f in batch if not f.done()]  # drop requests given up on
      try:
        results = await self.run(lambda: self._render_batch([job for job, _ in batch]))
      except Exception as e:  # pylint: disable=broad-except  (never let the worker die)
        results = [e] * len(batch)
      for (_, future), result in zip(batch, results):
        if future.done():
          continue
        if isinstance(result, Exception):
          future.set_exception(result)
        else:
          future.set_result(result)

  def _render_batch(self, jobs: list[Job]) -> list[np.ndarray | Exception]:
    """Each job's pixels (or the exception its render raised)."""
    self.stats["batches"] += 1
    self.stats["jobs"] += len(jobs)
    results: list[Any] = [None] * len(jobs)
    groups = collections.defaultdict(list)
    for i, job in enumerate(jobs):
      groups[(job.ref, job.level_hw)].append(i)
    for (ref, level_hw), members in groups.items():
      for box, inside in plan([jobs[i].window for i in members], self.max_pixels, self.max_waste):
        self.stats["render_calls"] += 1
        try:
          pixels = self._render(ref, level_hw, box)
        except Exception as e:  # pylint: disable=broad-except  (fails these requests only)
          self.stats["errors"] += 1
          for k in inside:
            results[members[k]] = e
          continue
        for k in inside:
          top, left, h, w = jobs[members[k]].window
          r, c = top - box[0], left - box[1]
          results[members[k]] = pixels[r:r + h, c:c + w]
    return results
