"""The one error type of user mistakes, and the parsers and checks of values users give.

A `UserError` is reported in one line with exit code 2 (the command line) or raised
to the caller (the Python API). `infd_jax.config_checks` validates a whole config
with these before any work; the Python API calls the same ones, so each fact about a
setting is checked in one place.
"""

import json
import os
from typing import Any, Mapping

import numpy as np

from infd_jax.guidance import KINDS
from infd_jax.rendering import tiles


class UserError(Exception):
  """A problem the user can fix (paths, settings); reported in one line, no traceback."""


MESH_AXES = ("data", "fsdp")  # the device mesh's axes (`sharding`)
_REGION_KEYS = {"kind", "size", "box", "image", "mask", "prompt", "scale"}


def is_int(v: Any) -> bool:
  """An integer that is not a bool."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  """A finite int or float that is not a bool."""
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and \
      bool(np.isfinite(v))


def is_local(path: str) -> bool:
  """A non-empty path that is not a URL (gs://, s3://)."""
  return bool(path) and "://" not in path


def parse_size(size: Any, name: str = "size") -> tuple[int, int]:
  """256 -> (256, 256); "480x640" or (480, 640) -> (480, 640); anything else: UserError."""
  if isinstance(size, (tuple, list)) and len(size) == 2:
    h, w = size
  elif is_int(size):
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
  if not all(is_int(v) for v in (h, w)):
    raise UserError(f"{name}={size!r}: height and width must be integers")
  if h <= 0 or w <= 0:
    raise UserError(f"{name}={size!r}: height and width must be positive")
  return int(h), int(w)


def parse_window(window: Any, size: tuple[int, int], name: str = "window"
                 ) -> tuple[int, int, int, int] | None:
  """() / None -> None; (top, left, height, width) inside size -> itself; else UserError."""
  if window is None or (isinstance(window, (tuple, list)) and not window):
    return None
  if not (isinstance(window, (tuple, list)) and len(window) == 4 and all(map(is_int, window))):
    raise UserError(f"{name}={window!r} is not (top, left, height, width) in integers")
  window = tuple(int(v) for v in window)
  try:
    tiles.check_window(size, window)
  except ValueError as e:
    raise UserError(f"{name}: {e}") from None
  return window


def plan_sizes(sizes: Any, window: Any, *, stream_above: int, tile: int, name: str
               ) -> list[tuple[tuple[int, int], tuple[int, int, int, int] | None, bool]]:
  """[(size, window or None, streamed)] of `sizes` x `window` (`sample_writer.plan`), each
  checked (UserError naming `<name>.sizes`, `<name>.window` or `config.sample.tile`).

  Whole images larger than `stream_above` pixels a side are streamed into BigTIFFs,
  whose tiles must be a multiple of 16 pixels.
  """
  if isinstance(sizes, (str, int)) or not isinstance(sizes, (list, tuple)) or not sizes:
    raise UserError(f"{name}.sizes={sizes!r}: give a tuple of sizes, "
                    "e.g. '(256, 1024, \"720x1280\")'")
  out = []
  for s in sizes:
    size = parse_size(s, name=f"{name}.sizes")
    win = parse_window(tuple(window), size, name=f"{name}.window")
    streamed = win is None and size[0] * size[1] > stream_above ** 2
    if streamed and tile % 16:
      raise UserError(f"config.sample.tile={tile}: a streamed BigTIFF needs a multiple of 16")
    out.append((size, win, streamed))
  return out


def check_count(n: Any, name: str) -> None:
  if not is_int(n) or n <= 0:
    raise UserError(f"{name}={n!r} must be a positive integer")


def parse_regions(regions: Any, name: str = "config.condition.regions",
                  clip_files: tuple[str, str] = ("", "")) -> list[dict]:
  """A region list (list of dicts or its JSON; `infd_jax.guidance.task` documents the keys),
  checked: kinds, sizes, boxes inside them, scales, prompts, image and mask files present,
  and for text regions the CLIP files (`condition.clip_checkpoint`, `condition.clip_vocab`)."""
  if isinstance(regions, str):
    try:
      regions = json.loads(regions) if regions.strip() else []
    except json.JSONDecodeError as e:
      raise UserError(f"{name} is not a JSON list: {e}") from None
  if not isinstance(regions, (list, tuple)) or not all(isinstance(r, dict) for r in regions):
    raise UserError(f"{name} must be a list of dicts (kind, size, box, ...)")
  regions = [dict(r) for r in regions]
  if not regions:
    raise UserError(f"{name} is empty: give at least one region")
  for i, r in enumerate(regions):
    where = f"{name}[{i}]"
    unknown = set(r) - _REGION_KEYS
    if unknown or "kind" not in r or "size" not in r:
      raise UserError(f"{where}: needs kind and size; unknown keys {sorted(unknown)} (known: "
                      f"{sorted(_REGION_KEYS)})")
    if r["kind"] not in KINDS:
      raise UserError(f"{where}: condition kind {r['kind']!r}: choose one of {', '.join(KINDS)}")
    size = parse_size(r["size"], f"{where}.size")
    box, scale = r.get("box", (0, 0, *size)), r.get("scale", 1.0)
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(map(is_int, box))
            and isinstance(scale, (int, float)) and not isinstance(scale, bool)):
      raise UserError(f"{where}: box {box!r} must be 4 integers (top, left, height, width) "
                      f"and scale {scale!r} a number")
    try:
      tiles.check_window(size, tuple(box), name="box")
    except ValueError as e:
      raise UserError(f"{where}: {e}") from None
    if r["kind"] == "text" and not r.get("prompt"):
      raise UserError(f"{where}: a text region needs a prompt")
    image = r.get("image")
    if r["kind"] != "text" and (image is None or isinstance(image, str) and not image):
      raise UserError(f"{where}: a {r['kind']} region needs an image")
    for key in ("image", "mask"):  # a file (an image may also be an array, from the Python API)
      path = r.get(key)
      if isinstance(path, (str, os.PathLike)) and path and is_local(os.fspath(path)) and \
          not os.path.isfile(os.path.expanduser(path)):
        raise UserError(f"{where}: {key} {path} not found")
  if any(r["kind"] == "text" for r in regions):
    for key, path in zip(("clip_checkpoint", "clip_vocab"), clip_files):
      if not path:
        raise UserError("text regions need config.condition.clip_checkpoint (a folder written "
                        "by python -m infd_jax.clip.convert) and config.condition.clip_vocab "
                        "(bpe_simple_vocab_16e6.txt.gz)")
      if is_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise UserError(f"config.condition.{key}={path!r}: not found")
  return regions


def check_start_and_fit(settings: Mapping[str, Any], name: str = "config.condition", *,
                        sampling: bool = True) -> None:
  """The `condition` settings of a guided start (`init_image`, `start`) and of data
  consistency (`fit_steps`, `fit_lr`, `fit_zeta`; `guidance.sampler.Refine`), checked for
  the `condition` job and `Model.condition` alike; UserError naming `<name>.<setting>`.

  Args:
    settings: those five settings (a `condition` config section, or a mapping whose
      init_image may be an array [h, w, 3] from the Python API).
    name: the settings' prefix in messages (`config.condition`; `condition` in the API).
    sampling: they are used now (a condition job or call), so a start below 1 needs an
      init_image and a local init_image file must exist.
  """
  def fail(key: str, problem: str) -> None:
    raise UserError(f"{name}.{key}={settings[key]!r}: {problem}")
  start, image = settings["start"], settings["init_image"]
  if not is_number(start) or not 0 < start <= 1:
    fail("start", "must be a number in (0, 1] (the share of the DDIM iterations run)")
  if not is_int(settings["fit_steps"]) or settings["fit_steps"] < 0:
    fail("fit_steps", "must be an integer >= 0 (Adam steps on each guided x0; 0: DPS)")
  if not is_number(settings["fit_lr"]) or settings["fit_lr"] <= 0:
    fail("fit_lr", "must be a number > 0")
  if not is_number(settings["fit_zeta"]) or not 0 <= settings["fit_zeta"] <= 1:
    fail("fit_zeta", "must be a number in [0, 1]")
  if not sampling:
    return
  is_path = isinstance(image, (str, os.PathLike))
  if image is None or is_path and not os.fspath(image):
    if start < 1:
      fail("start", "below 1 needs condition.init_image (the image whose latent sampling "
           "starts from)")
  elif is_path and is_local(os.fspath(image)) and not os.path.isfile(os.path.expanduser(image)):
    fail("init_image", "not found")


def mesh_shape(data: int, fsdp: int, devices: int) -> tuple[int, int]:
  """(data, fsdp) with -1 resolved to all remaining devices; UserError unless it uses them all."""
  if data == -1 and fsdp == -1:
    raise UserError("config.mesh.fsdp=-1: only one of mesh.data and mesh.fsdp may be -1")
  data = devices // fsdp if data == -1 else data
  fsdp = devices // data if fsdp == -1 else fsdp
  if data * fsdp != devices:
    raise UserError(f"config.mesh: data={data} x fsdp={fsdp} does not use the {devices} "
                    "devices available")
  return data, fsdp


def batch_layout_problem(setting: str, global_batch: int, mesh: tuple[int, int],
                         processes: int) -> str:
  """'' if a global batch splits over the mesh and processes, else the numbers and the fixes.

  A batch's leading axis shards over every device, and each process feeds the rows
  of its own devices, so the global batch must divide by the device count.
  """
  n = mesh[0] * mesh[1]
  if global_batch > 0 and global_batch % n == 0 and global_batch % processes == 0:
    return ""
  lower, upper = global_batch // n * n, (global_batch // n + 1) * n
  divisors = [d for d in range(n, 0, -1) if n % d == 0 and global_batch % d == 0 and d >= processes
              and d % processes == 0]
  fixes = f"--config.{setting}={upper}" + (f" (or {lower})" if lower else "")
  if divisors:
    fixes += (f", or run on {divisors[0]} devices (a mesh whose data x fsdp divides "
              f"{global_batch})")
  return (f"config.{setting}={global_batch} does not split over {n} devices (mesh data={mesh[0]}"
          f" x fsdp={mesh[1]}, {processes} processes, {n // processes} devices each): use "
          f"{fixes}; scale the learning rate with the batch (README: Multi-GPU and TPU pods)")
