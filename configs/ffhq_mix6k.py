"""FFHQ 6K-Mix (REFERENCE.md 2.5, 5.2): half the AE samples from 70k LR images at 256,
half from 6k HR images at 512..1024; no validation split; the DM uses all 70k at 256."""

from infd_jax import defaults


def get_config(arg: str | None = None):
  arg = defaults.parse_arg(arg, stage="ae")
  c = defaults.base()
  c.stage = arg.stage
  c.data.variant = "mix6k"
  c.data.split = "train+val"
  c.data.eval_split = ""
  c.data.dm_split = "train+val"  # the mix6k DM trains on all 70k images at 256
  c.train.eval_every = 0
  return c
