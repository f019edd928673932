"""Config checks that run before any work, so a mistake is one clear line.

Each failure is a `UserError` naming the setting and what would be valid.
"""


import ml_collections



class UserError(Exception):
  """A problem the user can fix (paths, settings); reported in one line, no traceback."""

STAGES = ("ae", "dm", "sample", "eval", "condition", "all")
DTYPES = ("float32", "bfloat16", "float16")


def _positive(config: ml_collections.ConfigDict, *keys: str) -> None:
  for key in keys:
    value = config
    for part in key.split("."):
      value = value[part]
    if not isinstance(value, int) or value <= 0:
      raise UserError(f"config.{key}={value!r}: must be a positive integer")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for an invalid stage, dtype or inconsistent sizes."""
  if config.stage not in STAGES:
    raise UserError(f"config.stage={config.stage!r}: choose one of {', '.join(STAGES)}")
  if config.train.compute_dtype not in DTYPES:
    raise UserError(f"config.train.compute_dtype={config.train.compute_dtype!r}: "
                    f"choose one of {', '.join(DTYPES)}")
  _positive(config, "data.inp_res", "data.patch", "data.gt_res_min", "data.gt_res_max",
            "train.ae_batch_size", "train.dm_batch_size", "train.log_every", "train.ckpt_every",
            "ae.ch", "ae.num_codes")
  d = config.data
  factor = 2 ** (len(config.ae.ch_mult) - 1)
  if d.inp_res % factor:
    raise UserError(f"config.data.inp_res={d.inp_res} must be a multiple of {factor} "
                    f"(the encoder halves it {len(config.ae.ch_mult) - 1} times, "
                    f"config.ae.ch_mult={tuple(config.ae.ch_mult)})")
  if not d.patch <= d.gt_res_min <= d.gt_res_max:
    raise UserError(f"config.data: need patch <= gt_res_min <= gt_res_max, got patch={d.patch}, "
                    f"gt_res_min={d.gt_res_min}, gt_res_max={d.gt_res_max}")
  for key, width in (("ae.ch", config.ae.ch), ("ae.renderer_hidden", config.ae.renderer_hidden),
                     ("dm.model_channels", config.dm.model_channels)):
    if width % 32:
      raise UserError(f"config.{key}={width}: must be a multiple of 32 (GroupNorm has 32 groups)")

