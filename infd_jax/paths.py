"""Paths taken from users: local or remote (`gs://`), always as `etils.epath.Path`."""

import os

from etils import epath


def absolute(path: str | os.PathLike) -> epath.Path:
  """Local paths expanded (~) and made absolute (orbax needs that); URLs kept as given."""
  if "://" in os.fspath(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
