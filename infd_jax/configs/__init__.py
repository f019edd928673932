"""Experiment configs shipped with the package, and how `--config` finds them.

`--config` takes a file path (`my_config.py`, `configs/ffhq.py`) or the name of
a packaged config (`ffhq`, `demo`, `custom:size=small`). A path that does not
exist but names a packaged config (`configs/ffhq.py`, as the README writes it
from the repository root) resolves to the packaged file, so the same command
works from any folder once the package is installed.
"""

import importlib.util
import pathlib

PACKAGE_DIR = pathlib.Path(__file__).parent


def names() -> list[str]:
  """Packaged config names (files with a `get_config`)."""
  return sorted(p.stem for p in PACKAGE_DIR.glob("*.py")
                if not p.stem.startswith("_") and p.stem != "common")


def resolve(spec: str) -> str:
  """`path[:arg]` or `name[:arg]` -> an existing file path with the same `:arg`.

  Unchanged when the path exists or names no packaged config (the loader then
  reports the missing file).
  """
  path, sep, arg = spec.partition(":")
  if pathlib.Path(path).expanduser().is_file():
    return spec
  stem = pathlib.PurePath(path).stem if path.endswith(".py") else path
  if stem in names() and (path == stem or pathlib.PurePath(path).parent.name in ("configs", "")):
    return str(PACKAGE_DIR / f"{stem}.py") + sep + arg
  return spec


def resolve_argv(argv: list[str]) -> list[str]:
  """Command-line arguments with `--config[=| ]NAME[:arg]` resolved by `resolve`."""
  out = []
  for arg in argv:
    if out and out[-1] in ("--config", "-config"):
      arg = resolve(arg)
    for prefix in ("--config=", "-config="):
      if arg.startswith(prefix):
        arg = prefix + resolve(arg[len(prefix):])
    out.append(arg)
  return out


def load(spec: str):
  """`path[:arg]` or `name[:arg]` -> the ConfigDict of its `get_config(arg)` (for scripts)."""
  path, _, arg = resolve(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location("infd_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
