"""One logging system for the command-line tools: Python's `logging`, by logger name.

Every infd_jax module logs through `logging.getLogger(__name__)` (the tools run as
`__main__` name theirs `infd_jax.<module>`), so levels are set by name, not by
file: infd_jax's INFO lines always show; libraries (jax, orbax and TFDS through
absl's logger, grain, ...) show WARNING and above unless `--verbosity=1`.
"""

import logging
import os

from absl import logging as absl_logging


def configure(verbosity: int = 0) -> None:
  """Sets the levels for a command-line run (call it before jax loads).

  Args:
    verbosity: absl's `--verbosity`; > 0 lets every library's INFO through, < 0
      keeps infd_jax's INFO out too.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1" if verbosity > 0 else "3")
  libraries = logging.INFO if verbosity > 0 else logging.WARNING
  logging.getLogger().setLevel(libraries)
  absl_logging.set_verbosity(absl_logging.INFO if verbosity > 0 else absl_logging.WARNING)
  logging.getLogger("infd_jax").setLevel(logging.WARNING if verbosity < 0 else logging.INFO)
