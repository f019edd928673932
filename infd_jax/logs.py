"""Quiet logs: our INFO lines and progress, library INFO only when asked for.

Libraries log through absl or their own Python loggers (orbax, TFDS, jax's
backend probing, grain). By default only records of level WARNING and above
pass from them; INFO from infd_jax and from clu's progress/metric writers
passes always. `--verbosity=1` (absl's flag) lets everything through.
"""

import logging
import os

_OURS = (f"{os.sep}infd_jax{os.sep}", f"{os.sep}clu{os.sep}")


class _QuietLibraries(logging.Filter):
  """Drops library records below WARNING (keeps infd_jax's and clu's)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or any(p in record.pathname for p in _OURS)


_FILTER = _QuietLibraries()


def configure(verbosity: int = 0) -> None:
  """Filters the root logger's handlers unless `verbosity` > 0 (idempotent).

  Also silences the C++ side of TensorFlow-based libraries, if any is present.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if verbosity > 0 else "3")
  for handler in logging.getLogger().handlers:
    if verbosity > 0:
      handler.removeFilter(_FILTER)
    else:
      handler.addFilter(_FILTER)
