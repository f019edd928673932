"""Reads PyTorch `.pth` checkpoints (zip format) into numpy, without torch and safely.

`torch.save` writes a zip archive `<prefix>/data.pkl` (a protocol-2 pickle of
the saved object) plus one raw little-endian file `<prefix>/data/<key>` per
tensor storage. Tensors appear in the pickle as calls to
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` whose
storage is a persistent id `('storage', <torch.XStorage>, key, location, numel)`.

The unpickler here only resolves the handful of globals such a file of plain
containers and tensors needs; every other global (e.g. `os.system` smuggled in
through `__reduce__`) raises `UnsafeCheckpointError` before anything runs.
Storage files are memory-mapped, so contiguous tensors are zero-copy read-only
views and unused parts of a checkpoint (optimizer moments) are never paged in.
"""

import collections
import io
import mmap
import os
import pickle
import struct
import types
import zipfile
from typing import Any, Callable, NamedTuple

import ml_dtypes
import numpy as np


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The pickle references a global outside the allow-list (it could run code)."""


class CheckpointFormatError(ValueError):
  """The file is not a well-formed PyTorch zip checkpoint."""


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}


class _StorageType(NamedTuple):
  """Stands in for a `torch.XStorage` class inside the unpickled persistent ids.

  Immutable with no `__setstate__`, so a pickle BUILD cannot alter the shared instance.
  """
  name: str
  dtype: np.dtype


def _rebuild_tensor_v2(storage: np.ndarray, offset: int, size, stride,
                       requires_grad=False, backward_hooks=None, metadata=None) -> np.ndarray:
  """Returns the (possibly strided) view of a flat storage as an array."""
  del requires_grad, backward_hooks, metadata  # Autograd bookkeeping only.
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
    raise CheckpointFormatError(f"bad tensor geometry size={size} stride={stride} offset={offset}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:  # Guards the strided view below against out-of-bounds reads.
    raise CheckpointFormatError(
        f"tensor (size={size}, stride={stride}, offset={offset}) overruns its storage "
        f"of {storage.size} elements")
  contiguous = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
  flat = storage[offset:]
  if all(n == 1 or s == c for n, s, c in zip(size, stride, contiguous)):
    return flat[:int(np.prod(size))].reshape(size)
  view = np.lib.stride_tricks.as_strided(
      flat, shape=size, strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func: Callable[..., Any], new_type, args, state):
  """Tensor subclasses (e.g. Parameter) pickled through their type: keep the data."""
  del new_type
  if state:
    raise UnsafeCheckpointError("tensor subclasses with Python state are not supported")
  return func(*args)


def _numpy_scalar(dtype: np.dtype, data: bytes):
  if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
    raise UnsafeCheckpointError("only numeric numpy scalars are allowed")
  return np.frombuffer(data, dtype, count=1)[0]


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
  if not isinstance(text, str):
    raise UnsafeCheckpointError("_codecs.encode called on a non-string")
  return text.encode(encoding)


def _sealed(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` behind a bound method, which has no attributes a pickle BUILD could set.

  A plain function would let BUILD overwrite e.g. its `__defaults__` for every
  later load in the process.
  """
  return types.MethodType(lambda _, *args: fn(*args), _sealed)


# (module, name) -> the object the unpickler hands back. Nothing here can run
# arbitrary code: rebuild functions only slice arrays, OrderedDict/tuple are data.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _sealed(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _sealed(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _sealed(_rebuild_parameter),
    ("torch._tensor", "_rebuild_from_type_v2"): _sealed(_rebuild_from_type_v2),
    ("torch", "Tensor"): "torch.Tensor",
    ("torch.nn.parameter", "Parameter"): "torch.nn.Parameter",
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # Protocol 2 pickles `bytes` as _codecs.encode(latin1_str, 'latin1').
    ("_codecs", "encode"): _sealed(_codecs_encode),
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _sealed(_numpy_scalar),
    ("numpy._core.multiarray", "scalar"): _sealed(_numpy_scalar),
}
_ALLOWED_GLOBALS.update(
    {("torch", n): _StorageType(n, np.dtype(t)) for n, t in _STORAGE_DTYPES.items()})


class ScriptObject:
  """An object of a TorchScript archive's module tree: inert, only its attribute dict.

  TorchScript pickles each module as `GLOBAL __torch__.<type>`, NEWOBJ with no
  arguments, then BUILD with a dict of its attributes (parameters, buffers,
  submodules, plain values); nothing of the type is looked up or run.
  """
  __slots__ = ("state",)

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise CheckpointFormatError(f"TorchScript object state is a {type(state).__name__}")
    self.state = dict(state)


def script_object_state(obj: Any) -> dict[str, Any] | None:
  """The attributes of a `ScriptObject` (None for anything else)."""
  return getattr(obj, "state", None) if isinstance(obj, ScriptObject) else None


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only allow-listed globals; storages come from `load_storage`."""

  def __init__(self, file, load_storage: Callable[[str, np.dtype, int], np.ndarray],
               torchscript: bool = False):
    super().__init__(file, encoding="utf-8")
    self._load_storage = load_storage
    self._torchscript = torchscript

  def find_class(self, module: str, name: str):
    if self._torchscript and module.startswith("__torch__."):
      return ScriptObject
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f"checkpoint pickle references {module}.{name}, which is not allowed in a "
          "checkpoint of plain containers and tensors; refusing to load it") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise CheckpointFormatError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _, numel = pid[:5]
    return self._load_storage(str(key), storage_type.dtype, int(numel))


class _ZipCheckpoint:
  """Random access to one torch zip checkpoint, with memory-mapped storages."""

  def __init__(self, path: str | os.PathLike):
    self._file = open(path, "rb")
    try:
      self._zip = zipfile.ZipFile(self._file)
      self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
      pkl = [n for n in self._zip.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
      if len(pkl) != 1:
        raise CheckpointFormatError(f"{path}: expected one <prefix>/data.pkl, found {pkl}")
      self._prefix = pkl[0][:-len("data.pkl")]
      order = self._read_optional("byteorder")
    except BaseException:
      self._file.close()
      raise
    self._big_endian = order is not None and order.strip() == b"big"
    self._storages: dict[tuple[str, np.dtype], np.ndarray] = {}

  def _read_optional(self, name: str) -> bytes | None:
    try:
      return self._zip.read(self._prefix + name)
    except KeyError:
      return None

  def _entry_bytes(self, name: str) -> memoryview | bytes:
    info = self._zip.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
      return self._zip.read(name)
    # Local header: 30 fixed bytes, then the file name and extra field.
    header = self._mmap[info.header_offset:info.header_offset + 30]
    if header[:4] != b"PK\x03\x04":
      raise CheckpointFormatError(f"bad zip local header for {name}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    return memoryview(self._mmap)[start:start + info.file_size]

  def storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
    """The flat storage `data/<key>` as `numel` elements of `dtype` (cached)."""
    if (key, dtype) not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        raw = self._entry_bytes(name)
      except KeyError:
        raise CheckpointFormatError(f"missing storage record {name}") from None
      if len(raw) < numel * dtype.itemsize:
        raise CheckpointFormatError(
            f"storage {name} has {len(raw)} bytes, expected {numel} x {dtype.itemsize}")
      arr = np.frombuffer(raw, dtype.newbyteorder(">" if self._big_endian else "<"), count=numel)
      self._storages[key, dtype] = arr if arr.dtype.isnative else arr.astype(dtype)
    return self._storages[key, dtype]

  def load(self, torchscript: bool = False) -> Any:
    """Unpickles data.pkl; the arrays keep the memory map alive after closing."""
    try:
      with self._zip.open(self._prefix + "data.pkl") as f:
        return _RestrictedUnpickler(io.BytesIO(f.read()), self.storage, torchscript).load()
    except (AttributeError, TypeError, IndexError, EOFError) as e:
      # E.g. a BUILD opcode trying to set attributes on an allowed global.
      raise CheckpointFormatError(f"malformed checkpoint pickle: {e!r}") from e
    finally:
      self._zip.close()
      self._file.close()


def load_torch_state_dict(path: str | os.PathLike, torchscript: bool = False) -> Any:
  """Loads a `torch.save` file into nested Python containers of numpy arrays.

  Args:
    path: a `.pth` written by PyTorch >= 1.6 (zip serialization).
    torchscript: also accept a TorchScript archive (`torch.jit.save`): its
      modules come back as `ScriptObject`s (see `script_object_state`).

  Returns:
    The saved object (for INFD: {'model': {'name', 'args', 'sd'}, 'cfg',
    'optimizers', 'iter', ...}) with every tensor replaced by an np.ndarray of
    its dtype and shape. Contiguous tensors are read-only views of a memory map.

  Raises:
    UnsafeCheckpointError: the pickle references anything beyond plain
      containers and tensors (nothing of it is executed).
    CheckpointFormatError: the file is not a PyTorch zip checkpoint.
  """
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      head = f.read(2)
    hint = (" It looks like PyTorch's legacy (pre-1.6) serialization; re-save it with "
            "torch.save(torch.load(p), p) on a recent PyTorch.") if head[:1] == b"\x80" else ""
    raise CheckpointFormatError(f"{path} is not a PyTorch zip checkpoint.{hint}")
  return _ZipCheckpoint(path).load(torchscript)
