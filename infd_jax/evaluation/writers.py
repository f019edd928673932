"""Metrics to the log and to TensorBoard event files (tensorboardX, no TensorFlow).

`create_writer(logdir, just_logging=...)` builds one explicitly; nothing is
registered at import. A writer logs every scalar it gets and, unless
`just_logging` (processes other than the first), writes events under `logdir`,
a local folder or a `gs://` / `s3://` URL (written through etils.epath).
"""

import logging
import math
from typing import Any, Mapping

from etils import epath
import numpy as np
import tensorboardX
from tensorboardX import record_writer as tbx_record_writer
from tensorboardX import summary as tbx_summary

from infd_jax.rendering import pixels

log = logging.getLogger(__name__)
Array = Any  # numpy array or jax.Array
Scalar = int | float | np.number | Array


class _EpathEventFiles:
  """tensorboardX writes `gs://` (and `s3://`) event files through etils.epath (fsspec/gcsfs)."""

  class _File:
    """write/flush/close only: tensorboardX fsyncs anything that has a `fileno`."""

    def __init__(self, path: str):
      self._file = epath.Path(path).open("wb")
      self.write, self.flush, self.close = self._file.write, self._file.flush, self._file.close

  def open(self, path: str):
    return self._File(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tile(images: np.ndarray, ncols: int, padding: int) -> np.ndarray:
  """[N, H, W, C] uint8 -> one grid image, row-major, `padding` black pixels apart."""
  n, h, w, c = images.shape
  ncols = max(1, min(ncols, n))
  rows = math.ceil(n / ncols)
  cells = np.zeros((rows * ncols, h + padding, w + padding, c), np.uint8)
  cells[:n, padding:, padding:] = images
  grid = cells.reshape(rows, ncols, h + padding, w + padding, c).transpose(0, 2, 1, 3, 4)
  grid = grid.reshape(rows * (h + padding), ncols * (w + padding), c)
  return np.pad(grid, ((0, padding), (0, padding), (0, 0)))


def make_image_grid(images: Array, ncols: int, padding: int = 2, min_side: int = 0) -> np.ndarray:
  """Tiles images in [-1, 1] into one uint8 picture for `write_images`.

  Args:
    images: [N, H, W, C] float in [-1, 1] (values outside are clipped; pixels as saved PNGs).
    ncols: images per row.
    padding: black border between and around images, in pixels.
    min_side: enlarge each image by the smallest integer factor k (pixel
      repetition) that makes min(k*H, k*W) >= min_side, so small tiles are visible.

  Returns:
    [rows*(kH+padding)+padding, ncols*(kW+padding)+padding, C] uint8.
  """
  u8 = pixels.to_uint8(images)
  k = max(1, -(-min_side // min(u8.shape[1:3])))
  return _tile(u8.repeat(k, axis=1).repeat(k, axis=2), ncols, padding)


def _to_uint8(image: np.ndarray) -> np.ndarray:
  """uint8 as is, floats in [0, 1]."""
  if image.dtype == np.uint8:
    return image
  return np.clip(np.round(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def _hparam_value(v: Any) -> bool | int | float | str:
  if isinstance(v, np.generic):
    v = v.item()
  return v if isinstance(v, (bool, int, float, str)) else str(v)


class MetricWriter:
  """Scalars to the log; scalars, images, texts and hyper-parameters to TensorBoard events."""

  def __init__(self, logdir: str | epath.PathLike, *, just_logging: bool, flush_secs: int = 30):
    self._events = None
    if not just_logging:
      scheme = str(logdir).split("://")[0] if "://" in str(logdir) else ""
      if scheme in ("gs", "s3"):
        tbx_record_writer.register_writer_factory(scheme, _EpathEventFiles())
      # tensorboardX queues events and writes them on its own thread.
      self._events = tensorboardX.SummaryWriter(logdir=str(logdir), flush_secs=flush_secs)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    log.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
    if self._events is not None:
      for key, value in values.items():
        self._events.add_scalar(key, value, global_step=step)

  def write_images(self, step: int, images: Mapping[str, Array]) -> None:
    """Images [H, W, C] or [N, H, W, C] (uint8, or float in [0, 1]); N>1 is tiled into a grid."""
    if self._events is None:
      return
    for key, value in images.items():
      img = _to_uint8(np.asarray(value))
      if img.ndim == 4:
        img = _tile(img, math.ceil(math.sqrt(img.shape[0])), padding=2)
      self._events.add_image(key, img, global_step=step, dataformats="HWC")

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    if self._events is not None:
      for key, value in texts.items():
        self._events.add_text(key, value, global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Into this run's own event file (SummaryWriter.add_hparams would open a new sub-run)."""
    if self._events is None:
      return
    hp = {k: _hparam_value(v) for k, v in hparams.items()}
    file_writer = self._events._get_file_writer()  # pylint: disable=protected-access
    for proto in tbx_summary.hparams(hp, {}):
      file_writer.add_summary(proto)

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()


def create_writer(logdir: str | epath.PathLike, *, just_logging: bool) -> MetricWriter:
  """A writer of one run (jobs pass `<workdir>/<stage>`, so each stage is its own TensorBoard
  run); pass just_logging=jax.process_index() > 0 so only the first host writes events."""
  return MetricWriter(logdir, just_logging=just_logging)
