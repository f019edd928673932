"""CPU time and added peak memory of repeated calls, and the first call's output (stdlib and
numpy only: used by the torch-side worker of `bench.vs_official` too, where jax need not be
installed)."""

import os
import pathlib
import time
from typing import Any, Callable

import numpy as np


def pin(threads: int) -> None:
  """Restricts this process to the first `threads` CPUs it may use (before any thread pool
  is made, so torch and XLA size theirs to them)."""
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])


def rss_kib(field: str) -> int:
  """A memory field of /proc/self/status (VmRSS, VmHWM) in KiB."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1])
  raise KeyError(field)


def measure(fn: Callable[[], object], warmup: int, repeats: int, memory: bool) -> dict:
  """CPU seconds (all threads of this process) and wall seconds of each timed call of
  `fn` after `warmup` calls; with `memory`, `peak_mib`: the peak resident memory
  of the process over all the calls above its resident memory before the first
  (the model loaded), i.e. what the calls needed at most, allocator caches included.
  """
  if memory:
    base = rss_kib("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
  for _ in range(warmup):
    fn()
  result = {"cpu_s": [], "wall_s": []}
  for _ in range(repeats):
    c, w = time.process_time(), time.perf_counter()
    fn()
    result["cpu_s"].append(time.process_time() - c)
    result["wall_s"].append(time.perf_counter() - w)
  if memory:
    result["peak_mib"] = (rss_kib("VmHWM") - base) / 1024
  return result


class FirstOutput:
  """Wraps a no-argument callable; keeps the result of its first call in `value`."""

  def __init__(self, fn: Callable[[], Any]):
    self.fn, self.value, self.called = fn, None, False

  def __call__(self) -> Any:
    out = self.fn()
    if not self.called:
      self.value, self.called = out, True
    return out


def save_output(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """A workload's output as float64 arrays (images and feature maps NHWC) in an .npz."""
  np.savez(path, **{k: np.asarray(v, np.float64) for k, v in arrays.items()})
