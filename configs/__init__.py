"""Experiment configs (ml_collections `get_config(arg)` files), shared defaults in `infd_jax.defaults`.

Run one with `python -m infd_jax.main --config=configs/ffhq.py` from the repository root
(or `--config=ffhq` from anywhere once installed: the package ships this folder as
`infd_jax.configs`). A config built on another one loads it with
`infd_jax.config_files.load(name)`, which works in both places.
"""
