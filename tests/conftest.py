"""Test setup: 8 simulated CPU devices and a persistent compilation cache.

The environment must be set before jax is imported anywhere.
"""

import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the environment is set)

_CACHE = os.environ.get("INFD_TEST_JAX_CACHE",
                        str(pathlib.Path(tempfile.gettempdir()) / "infd_jax_test_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
