"""Which packages the wheel holds (the rest of the metadata is in pyproject.toml).

`infd_jax` and its subpackages, plus the repository's top-level `configs/` folder
shipped as `infd_jax.configs` (the same files, not a copy; see infd_jax/config_files.py).
"""

import setuptools

setuptools.setup(
    packages=setuptools.find_packages(include=["infd_jax", "infd_jax.*"]) + ["infd_jax.configs"],
    package_dir={"infd_jax.configs": "configs"})
