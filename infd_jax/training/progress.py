"""Training progress: steps/s, ETA and the share of time spent in named sections."""

import collections
import contextlib
import logging
import time
from typing import Iterator

from infd_jax.evaluation import writers

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
  """Call it after every step: every `every` steps (and at the last) it logs steps/s, the
  ETA and how the time splits over `timed` sections, and writes `steps_per_sec`."""

  def __init__(self, total_steps: int, writer: writers.MetricWriter, every: int):
    self._total, self._writer, self._every = total_steps, writer, every
    self._sections: dict[str, float] = collections.defaultdict(float)
    self._t0 = self._last_time = time.monotonic()
    self._last_step: int | None = None

  def __call__(self, step: int) -> None:
    now = time.monotonic()
    if self._last_step is None:  # the first step compiles: measure from its end
      self._last_step, self._last_time = step, now
      return
    if step % self._every and step != self._total:
      return
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    split = ", ".join(f"{100 * t / (now - self._t0):.1f}% {name}"
                      for name, t in sorted(self._sections.items()))
    log.info("%.2f steps/s, %d/%d steps, ETA %s%s", rate, step, self._total,
             _duration((self._total - step) / max(rate, 1e-9)), f" ({split})" if split else "")
    self._writer.write_scalars(step, {"steps_per_sec": rate, "uptime": now - self._t0})

  @contextlib.contextmanager
  def timed(self, name: str) -> Iterator[None]:
    """Counts the time inside the block towards section `name`."""
    start = time.monotonic()
    try:
      yield
    finally:
      self._sections[name] += time.monotonic() - start
