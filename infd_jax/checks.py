"""Config checks that run before any work, so a mistake is one clear line.

Each failure is a `UserError` naming the setting and what would be valid.
"""


from typing import Any

import ml_collections
import numpy as np

from infd_jax.rendering import tiles



class UserError(Exception):
  """A problem the user can fix (paths, settings); reported in one line, no traceback."""

STAGES = ("ae", "dm", "sample", "eval", "condition", "all")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: JAX x64 mode only


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
            "ae.ch")
  if not isinstance(config.ae.num_codes, int) or config.ae.num_codes < 0:
    raise UserError(f"config.ae.num_codes={config.ae.num_codes!r}: must be a codebook size, "
                    "or 0 for no quantizer")
  d = config.data
  factor = 2 ** (len(config.ae.ch_mult) - 1)
  if d.inp_res % factor:
    raise UserError(f"config.data.inp_res={d.inp_res} must be a multiple of {factor} "
                    f"(the encoder halves it {len(config.ae.ch_mult) - 1} times, "
                    f"config.ae.ch_mult={tuple(config.ae.ch_mult)})")
  if not d.patch <= d.gt_res_min <= d.gt_res_max:
    raise UserError(f"config.data: need patch <= gt_res_min <= gt_res_max, got patch={d.patch}, "
                    f"gt_res_min={d.gt_res_min}, gt_res_max={d.gt_res_max}")
  for key, width, groups in (
      ("ae.ch", config.ae.ch, config.ae.norm_groups),
      ("ae.renderer_hidden", config.ae.renderer_hidden, config.ae.norm_groups),
      ("dm.model_channels", config.dm.model_channels, config.dm.norm_groups)):
    if width % groups:
      raise UserError(f"config.{key}={width}: must be a multiple of {groups} (GroupNorm has "
                      f"{groups} groups, config.{key.split('.')[0]}.norm_groups)")


def parse_size(size: Any, name: str = "size") -> tuple[int, int]:
  """256 -> (256, 256); "480x640" or (480, 640) -> (480, 640); anything else: UserError."""
  if isinstance(size, (tuple, list)) and len(size) == 2:
    h, w = size
  elif isinstance(size, (int, np.integer)) and not isinstance(size, bool):
    h = w = size
  elif isinstance(size, str) and size.strip():
    parts = size.strip().lower().split("x")
    if len(parts) == 1:
      parts = parts * 2
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
      raise UserError(f"{name}={size!r} is not N or HxW (e.g. 1024 or 720x1280)")
    h, w = (int(p) for p in parts)
  else:
    raise UserError(f"{name}={size!r} is not N or HxW (e.g. 1024 or 720x1280)")
  if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (h, w)):
    raise UserError(f"{name}={size!r}: height and width must be integers")
  if h <= 0 or w <= 0:
    raise UserError(f"{name}={size!r}: height and width must be positive")
  return int(h), int(w)


def parse_window(window: Any, size: tuple[int, int], name: str = "window"
                 ) -> tiles.Window | None:
  """() / None -> None; (top, left, height, width) inside size -> itself; else UserError."""
  if window is None or (isinstance(window, (tuple, list)) and not window):
    return None
  if not (isinstance(window, (tuple, list)) and len(window) == 4
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in window)):
    raise UserError(f"{name}={window!r} is not (top, left, height, width) in integers")
  window = tuple(int(v) for v in window)
  try:
    tiles.check_window(size, window)
  except ValueError as e:
    raise UserError(f"{name}: {e}") from None
  return window


def check_count(n: Any, name: str) -> None:
  """UserError unless n is a positive integer."""
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
    raise UserError(f"{name}={n!r} must be a positive integer")
