"""Preemption: SIGTERM (and SIGINT) become a request the training loop checks between steps."""

import logging
import signal
import threading

import jax

log = logging.getLogger(__name__)


class StopRequest:
  """Turns SIGTERM (and SIGINT) into a flag the loop checks between steps.

  Jobs are preempted with SIGTERM; the loop then saves, waits for the write and
  exits 0, so a scheduler restart resumes where it stopped.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    log.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self._event.set()

  def requested(self) -> bool:
    """True on every process once any process got a stop signal."""
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(multihost_utils.process_allgather(local).any())

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
