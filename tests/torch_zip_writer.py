"""Test helper: writes `.pth` files in PyTorch's zip layout without torch.

The layout follows `torch.save` (PyTorch >= 1.6): a zip of uncompressed
entries `<prefix>/data.pkl` (protocol-2 pickle), `<prefix>/byteorder`,
`<prefix>/data/<key>` (raw little-endian storage bytes, 64-byte aligned) and
`<prefix>/version`. Tensors are pickled as
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False,
OrderedDict())` with the storage as persistent id
`('storage', torch.<X>Storage, key, 'cpu', numel)`.
"""

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


@dataclasses.dataclass(frozen=True)
class Global:
  """A reference to `module.name` pickled with the GLOBAL opcode (need not exist)."""
  module: str
  name: str

  def __call__(self, *args):  # pickle only checks that a reduce function is callable.
    raise NotImplementedError(f"{self.module}.{self.name} is a placeholder")


@dataclasses.dataclass(eq=False)
class TensorView:
  """A tensor viewing `storage` (a flat array, shared by identity) with torch strides."""
  storage: np.ndarray
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  def __reduce__(self):
    args = (self.storage, self.offset, tuple(self.size), tuple(self.stride), False,
            collections.OrderedDict())
    return Global("torch._utils", "_rebuild_tensor_v2"), args


class _Pickler(pickle._Pickler):  # The pure-Python pickler lets GLOBAL be written directly.
  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages: dict[int, tuple[str, np.ndarray]] = {}

  def _save_fake_global(self, obj: Global):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
    self.memoize(obj)

  dispatch[Global] = _save_fake_global

  def persistent_id(self, obj):
    if not isinstance(obj, np.ndarray):
      return None
    if id(obj) not in self.storages:
      self.storages[id(obj)] = (str(len(self.storages)), obj)
    key, _ = self.storages[id(obj)]
    return ("storage", Global("torch", _STORAGE_NAMES[obj.dtype]), key, "cpu", obj.size)


def _as_tensors(obj: Any) -> Any:
  """Replaces numpy arrays by contiguous TensorViews of their own storage."""
  if isinstance(obj, np.ndarray):
    arr = np.array(obj, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
    stride = tuple(s // arr.itemsize for s in arr.strides) if arr.ndim else ()
    return TensorView(arr.reshape(-1), 0, arr.shape, stride)
  if isinstance(obj, dict):
    return type(obj)((k, _as_tensors(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_as_tensors(v) for v in obj)
  return obj


def _write_aligned(zf: zipfile.ZipFile, name: str, data: bytes, align: int = 64) -> None:
  """Writes an uncompressed entry whose data starts on an `align`-byte boundary."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  # torch pads the local header's extra field (tag "FB") for the same alignment.
  data_start = zf.fp.tell() + 30 + len(name.encode("utf-8")) + 4
  pad = -data_start % align
  info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
  zf.writestr(info, data)


def save(obj: Any, path: str | os.PathLike, archive_name: str = "archive",
         pickle_bytes: bytes | None = None) -> None:
  """Writes `obj` (containers of numpy arrays / TensorViews) like `torch.save`.

  Args:
    obj: the object; numpy arrays become float32/int64/... tensors.
    path: output file.
    archive_name: the zip entry prefix (torch uses the file stem).
    pickle_bytes: if given, written as data.pkl instead of pickling `obj`
      (to craft malicious files); storages of `obj` are still written.
  """
  buf = io.BytesIO()
  pickler = _Pickler(buf)
  pickler.dump(_as_tensors(obj))
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    _write_aligned(zf, f"{archive_name}/data.pkl", pickle_bytes or buf.getvalue())
    _write_aligned(zf, f"{archive_name}/byteorder", b"little")
    for key, arr in pickler.storages.values():
      little = arr.astype(arr.dtype.newbyteorder("<"))
      _write_aligned(zf, f"{archive_name}/data/{key}", little.tobytes())
    _write_aligned(zf, f"{archive_name}/version", b"3\n")
