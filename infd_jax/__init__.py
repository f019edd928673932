"""infd_jax: Image Neural Field Diffusion Models in JAX/Flax.

`infd_jax.load(path)` (see `infd_jax.inference.load`) is the Python API; it is
imported on first use, so `import infd_jax` stays light.
"""

from typing import Any


def __getattr__(name: str) -> Any:
  if name == "load":
    from infd_jax import inference  # pylint: disable=g-import-not-at-top
    return inference.load
  raise AttributeError(f"module 'infd_jax' has no attribute {name!r}")
