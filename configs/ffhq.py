"""The official FFHQ setting (REFERENCE.md 2.5): `ae_ffhq` and `dm_ffhq`.

  python -m infd_jax.main --config=configs/ffhq.py --config.stage=ae --workdir=W \
      --config.data.data_dir=DATA
"""

from infd_jax import defaults


def get_config(arg: str | None = None):
  arg = defaults.parse_arg(arg, stage="ae")
  c = defaults.base()
  c.stage = arg.stage
  return c
