"""TensorBoard logging through CLU's `MetricWriter` interface, without TensorFlow.

`clu.metric_writers/__init__.py` imports its TensorFlow summary writer, so without
TensorFlow the whole package (and `clu.periodic_actions`) fails to import. Before
importing it, this module registers a stand-in for that one submodule whose
`SummaryWriter` is the tensorboardX writer below; with TensorFlow installed, clu is
left alone. Import this module before `clu.metric_writers` / `clu.periodic_actions`.
"""

import importlib.util
import math
import sys
import types
from typing import Any, Mapping

from absl import logging
from etils import epath
import numpy as np
import tensorboardX
from tensorboardX import record_writer as tbx_record_writer
from tensorboardX import summary as tbx_summary

from infd_jax.rendering import pixels


def _register_tf_free_summary_writer() -> None:
  name = "clu.metric_writers.summary_writer"
  if name in sys.modules or importlib.util.find_spec("tensorflow") is not None:
    return
  shim = types.ModuleType(name)
  shim.__doc__ = "TensorFlow-free stand-in registered by infd_jax.evaluation.writers."
  # Looked up at call time, so clu's create_default_writer(logdir) also works.
  shim.SummaryWriter = lambda logdir: TensorboardXWriter(logdir)
  sys.modules[name] = shim


_register_tf_free_summary_writer()


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


for _scheme in ("gs", "s3"):
  tbx_record_writer.register_writer_factory(_scheme, _EpathEventFiles())

from clu.metric_writers import interface  # noqa: E402  (needs the stand-in above)
from clu.metric_writers import logging_writer  # noqa: E402
from clu.metric_writers import multi_writer  # noqa: E402

MetricWriter = interface.MetricWriter

Array = interface.Array
Scalar = interface.Scalar


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
  """CLU's image convention: uint8 as is, floats in [0, 1]."""
  if image.dtype == np.uint8:
    return image
  return np.clip(np.round(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def _hparam_value(v: Any) -> bool | int | float | str:
  if isinstance(v, np.generic):
    v = v.item()
  return v if isinstance(v, (bool, int, float, str)) else str(v)


class TensorboardXWriter(interface.MetricWriter):
  """Writes TensorBoard event files with tensorboardX (it queues and writes on its own thread)."""

  def __init__(self, logdir: str, flush_secs: int = 30):
    super().__init__()
    self._writer = tensorboardX.SummaryWriter(logdir=str(logdir), flush_secs=flush_secs)

  def write_summaries(self, step: int, values: Mapping[str, Array],
                      metadata: Mapping[str, Any] | None = None):
    logging.log_first_n(logging.WARNING, "TensorboardXWriter ignores raw summaries.", 1)

  def write_scalars(self, step: int, scalars: Mapping[str, Scalar]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(np.asarray(value)), global_step=step)

  def write_images(self, step: int, images: Mapping[str, Array]):
    """Images [H, W, C] or [N, H, W, C] (uint8, or float in [0, 1]); N>1 is tiled into a grid."""
    for key, value in images.items():
      img = _to_uint8(np.asarray(value))
      if img.ndim == 4:
        img = _tile(img, math.ceil(math.sqrt(img.shape[0])), padding=2)
      self._writer.add_image(key, img, global_step=step, dataformats="HWC")

  def write_videos(self, step: int, videos: Mapping[str, Array]):
    logging.log_first_n(logging.WARNING, "TensorboardXWriter does not write videos.", 1)

  def write_audios(self, step: int, audios: Mapping[str, Array], *, sample_rate: int):
    logging.log_first_n(logging.WARNING, "TensorboardXWriter does not write audio.", 1)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._writer.add_text(key, value, global_step=step)

  def write_histograms(self, step: int, arrays: Mapping[str, Array],
                       num_buckets: Mapping[str, int] | None = None):
    for key, value in arrays.items():
      bins = None if num_buckets is None else num_buckets.get(key)
      self._writer.add_histogram(key, np.asarray(value, np.float64), global_step=step,
                                 max_bins=bins)

  def write_hparams(self, hparams: Mapping[str, Any]):
    # Written into this run's own event file: SummaryWriter.add_hparams would
    # open a new sub-run directory named after the wall clock.
    hp = {k: _hparam_value(v) for k, v in hparams.items()}
    file_writer = self._writer._get_file_writer()  # pylint: disable=protected-access
    for proto in tbx_summary.hparams(hp, {}):
      file_writer.add_summary(proto)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class _LoggingWriter(logging_writer.LoggingWriter):
  """Plain-log writer that leaves hyper-parameters out (the job logs the config once)."""

  def write_hparams(self, hparams: Mapping[str, Any]):
    del hparams


def create_writer(workdir: str, *, just_logging: bool) -> interface.MetricWriter:
  """Plain-log writer plus TensorBoard events in `workdir` (only the log when just_logging).

  Jobs pass `<workdir>/<stage>` so each stage is its own TensorBoard run.

  Pass just_logging=jax.process_index() > 0 so only the first host writes events.
  """
  writers: list[interface.MetricWriter] = [_LoggingWriter()]
  if not just_logging:
    writers.append(TensorboardXWriter(workdir))
  return multi_writer.MultiWriter(writers)
