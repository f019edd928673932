"""The viewer's two bounded caches: an in-memory LRU and rendered tiles on disk.

Both evict least recently used entries once a limit is passed, so the memory and
disk they take stay bounded whatever is requested.
"""

import collections
import hashlib
import os
import pathlib
import tempfile
import threading
from typing import Any, Callable, Generic, Hashable, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
  """A least-recently-used map holding at most `capacity` units of `cost(value)`.

  A value costing more than the whole capacity is returned by `get_or_make` but
  not kept. Thread-safe; `make` runs outside the lock.
  """

  def __init__(self, capacity: int, cost: Callable[[V], int] = lambda v: 1):
    self.capacity, self._cost = capacity, cost
    self._items: collections.OrderedDict[Hashable, tuple[V, int]] = collections.OrderedDict()
    self._total = 0
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._items)

  @property
  def total(self) -> int:
    """Cost of the values held now."""
    return self._total

  def get(self, key: Hashable) -> V | None:
    with self._lock:
      if key not in self._items:
        return None
      self._items.move_to_end(key)
      return self._items[key][0]

  def put(self, key: Hashable, value: V) -> None:
    cost = self._cost(value)
    with self._lock:
      if key in self._items:
        self._total -= self._items.pop(key)[1]
      if cost > self.capacity:
        return
      self._items[key] = (value, cost)
      self._total += cost
      while self._total > self.capacity:
        self._total -= self._items.popitem(last=False)[1][1]

  def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
    value = self.get(key)
    if value is None:
      value = make()
      self.put(key, value)
    return value


class DiskCache:
  """Files under `root`, at most `max_bytes` in all; the least recently read go first.

  Recency survives restarts through the files' modification times (touched on
  each hit). Writes are atomic (a temporary file renamed into place), so a reader
  never sees half a file. Keys are relative paths of safe parts (see `key_path`).
  """

  def __init__(self, root: str | os.PathLike, max_bytes: int):
    self.root, self.max_bytes = pathlib.Path(root), max_bytes
    self.root.mkdir(parents=True, exist_ok=True)
    self._sizes: collections.OrderedDict[pathlib.Path, int] = collections.OrderedDict()
    self._lock = threading.Lock()
    found = []
    for path in self.root.rglob("*"):
      if path.name.startswith(".part-"):  # a write cut short by a crash
        path.unlink(missing_ok=True)
      elif path.is_file():
        found.append((path.stat().st_mtime, path))
    for _, path in sorted(found):
      self._sizes[path] = path.stat().st_size
    self._total = sum(self._sizes.values())
    self._evict()

  @property
  def total_bytes(self) -> int:
    return self._total

  def get(self, key: str) -> bytes | None:
    path = self.root / key
    with self._lock:
      if path not in self._sizes:
        return None
      self._sizes.move_to_end(path)
    try:
      data = path.read_bytes()
      os.utime(path)
    except FileNotFoundError:  # removed behind our back: a miss
      with self._lock:
        self._total -= self._sizes.pop(path, 0)
      return None
    return data

  def put(self, key: str, data: bytes) -> None:
    if len(data) > self.max_bytes:
      return
    path = self.root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
    with self._lock:
      self._total += len(data) - self._sizes.pop(path, 0)
      self._sizes[path] = len(data)
      self._evict()

  def _evict(self) -> None:
    while self._total > self.max_bytes and self._sizes:
      path, size = self._sizes.popitem(last=False)
      self._total -= size
      path.unlink(missing_ok=True)


def key_path(*parts: Any) -> str:
  """A relative cache path from parts; each part's text becomes a safe file name."""
  safe = []
  for part in parts:
    text = str(part)
    if not text or not all(c.isalnum() or c in "-_." for c in text) or text.startswith("."):
      text = hashlib.sha256(text.encode()).hexdigest()[:32]
    safe.append(text)
  return "/".join(safe)
