"""Moved to `infd_jax.builders` (evaluation and inference must not import training).

Kept only so branches written before the move still import; new code imports
`infd_jax.builders`.
"""

from infd_jax.builders import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import
