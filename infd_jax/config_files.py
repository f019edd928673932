"""Where the experiment config files are, and how `--config` finds them.

The files live in the repository's top-level `configs/` folder; an installed
package ships the same files as `infd_jax.configs` (setup.py maps the folder),
not a second copy. `--config` takes a file path (`my_config.py`,
`configs/ffhq.py`) or the name of a shipped config (`ffhq`, `demo`,
`custom:size=small`); a path that does not exist but names a shipped config
(`configs/ffhq.py` outside the repository) resolves to the shipped file, so the
same command works from any folder once the package is installed.
"""

import importlib.util
import pathlib

import ml_collections

_PACKAGE = pathlib.Path(__file__).parent


def config_dir() -> pathlib.Path:
  """The shipped config files: `infd_jax/configs` when installed, else `<repository>/configs`."""
  installed = _PACKAGE / "configs"
  return installed if installed.is_dir() else _PACKAGE.parent / "configs"


def names() -> list[str]:
  """Shipped config names (files with a `get_config`)."""
  return sorted(p.stem for p in config_dir().glob("*.py") if not p.stem.startswith("_"))


def resolve(spec: str) -> str:
  """`path[:arg]` or `name[:arg]` -> an existing file path with the same `:arg`.

  Unchanged when the path exists or names no shipped config (the loader then
  reports the missing file).
  """
  path, sep, arg = spec.partition(":")
  if pathlib.Path(path).expanduser().is_file():
    return spec
  stem = pathlib.PurePath(path).stem if path.endswith(".py") else path
  if stem in names() and (path == stem or pathlib.PurePath(path).parent.name in ("configs", "")):
    return str(config_dir() / f"{stem}.py") + sep + arg
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


def load(spec: str) -> ml_collections.ConfigDict:
  """`path[:arg]` or `name[:arg]` -> the ConfigDict of its `get_config(arg)` (for scripts, and
  for config files built on another one)."""
  path, _, arg = resolve(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location(f"infd_config_{pathlib.Path(path).stem}",
                                                       path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
