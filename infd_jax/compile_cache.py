"""JAX's persistent compilation cache, so a repeated or resumed run starts in seconds.

`config.compile_cache`: "default" = the folder JAX_COMPILATION_CACHE_DIR names
if set, else `$XDG_CACHE_HOME/infd_jax/jax` (`~/.cache/infd_jax/jax`); "off"
(or "") = no cache; anything else = that folder (local or gs://). Entries are
keyed by program, jax version and backend, so one folder serves every config.
"""

import os

import jax
from etils import epath

MIN_COMPILE_SECS = 0.5  # smaller programs recompile faster than they load


def default_dir() -> epath.Path:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return epath.Path(root) / "infd_jax" / "jax"


def enable(setting: str) -> str | None:
  """Points JAX's persistent cache at the folder `setting` selects; returns it (None = off)."""
  if setting in ("off", ""):
    return None
  if setting == "default":
    folder = jax.config.jax_compilation_cache_dir or str(default_dir())
  else:
    folder = str(epath.Path(os.path.expanduser(setting)))
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder
