"""An in-memory `gs://` filesystem for tests: fsspec's MemoryFileSystem under the gcs protocol.

etils.epath hands `gs://` paths to fsspec's "gcs" implementation (gcsfs in
production); registering this one instead keeps every byte in this process, so a
test sees exactly what was written "remotely" and that nothing went to local disk.
"""

import contextlib
import importlib
from typing import Iterator

from etils.epath import backend
import fsspec
from fsspec.implementations.memory import MemoryFileSystem

registry = importlib.import_module("fsspec.registry")  # the module; fsspec.registry is a mapping


class FakeGCS(MemoryFileSystem):
  """Objects keyed "bucket/path" as gcsfs names them."""
  protocol = ("gs", "gcs")
  root_marker = ""
  store: dict = {}
  pseudo_dirs: list = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.rstrip("/")


@contextlib.contextmanager
def installed() -> Iterator[type[FakeGCS]]:
  """Routes gs:// through FakeGCS (empty) for the duration of the block."""
  previous = {p: registry.registry.get(p) for p in FakeGCS.protocol}
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  for p in FakeGCS.protocol:
    fsspec.register_implementation(p, FakeGCS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  try:
    yield FakeGCS
  finally:
    for p, cls in previous.items():
      if cls is None:
        registry._registry.pop(p, None)  # pylint: disable=protected-access
      else:
        fsspec.register_implementation(p, cls, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
