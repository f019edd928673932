"""The one writer of sample images, shared by the generation and condition jobs.

`plan` checks the requested sizes and window before any model work and names
each output folder: `<H>` for a square size (as the official `gen_samples.py`),
`<H>x<W>` otherwise, with `_window_<top>_<left>_<h>x<w>` appended for a window.
`SampleWriter.write` renders one batch's feature maps at every target with
`Model.render_owned` and writes each image once, by the process that holds it:
PNGs (`pixels.to_uint8`, the official truncation) encoded on a thread pool, or,
for sizes above `stream_above` pixels a side, a pyramidal BigTIFF streamed tile
by tile (`rendering.stream`; the renders span the mesh, process id %
process_count writes the file). So N samples are written exactly once whatever
the number of hosts.
"""

import concurrent.futures
import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath
from PIL import Image
from tqdm import tqdm

from infd_jax import checks
from infd_jax.model import Model
from infd_jax.rendering import pixels, stream, tiles


@dataclasses.dataclass(frozen=True)
class Target:
  """One requested output: a size, optionally a window of it, streamed or not."""
  size: tuple[int, int]
  window: tiles.Window | None
  streamed: bool

  @property
  def folder(self) -> str:
    h, w = self.size
    name = str(h) if h == w else f"{h}x{w}"
    if self.window is not None:
      name += "_window_{}_{}_{}x{}".format(*self.window)
    return name


def plan(sizes: Any, window: Any, *, stream_above: int, tile: int, name: str) -> list[Target]:
  """The targets of `sizes` x `window`, each checked (UserError naming `<name>.<key>`).

  Args:
    sizes: a tuple of sizes (N, "HxW" or (H, W)).
    window: () for whole images, or (top, left, height, width) inside each size.
    stream_above: whole images larger than this many pixels a side are streamed.
    tile: the tiling's tile size (a streamed BigTIFF needs a multiple of 16).
    name: the config section the settings come from, e.g. "config.sample".
  """
  if isinstance(sizes, (str, int)) or not sizes:
    raise checks.UserError(f"{name}.sizes={sizes!r}: give a tuple of sizes, "
                           "e.g. '(256, 1024, \"720x1280\")'")
  targets = []
  for s in sizes:
    size = checks.parse_size(s, name=f"{name}.sizes")
    win = checks.parse_window(tuple(window), size, name=f"{name}.window")
    streamed = win is None and size[0] * size[1] > stream_above ** 2
    if streamed and tile % 16:
      raise checks.UserError(f"config.sample.tile={tile}: a streamed BigTIFF needs a multiple "
                             "of 16")
    targets.append(Target(size, win, streamed))
  return targets


def _save_png(image: np.ndarray, path: epath.Path) -> None:
  with path.open("wb") as f:
    Image.fromarray(image).save(f, format="PNG")


class SampleWriter:
  """Writes batches of samples at every target into `out_dir`; a context manager.

  Every process calls `write` together with the same ids; `written` counts the
  images this process wrote.
  """

  def __init__(self, model: Model, out_dir: epath.Path, targets: Sequence[Target], total: int,
               desc: str = "images"):
    self.model, self.out_dir, self.targets = model, epath.Path(out_dir), list(targets)
    for target in self.targets:
      (self.out_dir / target.folder).mkdir(parents=True, exist_ok=True)
    self.written = 0
    self._pool = concurrent.futures.ThreadPoolExecutor(4)
    self._pending: list[concurrent.futures.Future] = []
    self._progress = tqdm(total=total * len(self.targets), desc=desc, unit="img",
                          disable=jax.process_index() > 0)

  def __enter__(self) -> "SampleWriter":
    return self

  def __exit__(self, *exc) -> None:
    for future in self._pending:
      future.result()
    self._pool.shutdown()
    self._progress.close()

  def write(self, phi: jax.Array, ids: np.ndarray) -> None:
    """Renders and writes samples `ids` from their feature maps phi [>= len(ids), ...]
    (`Model.decode_global`; rows past len(ids) pad the batch to the device count)."""
    for target in self.targets:
      folder = self.out_dir / target.folder
      if target.streamed:
        self._stream(folder, phi, ids, target.size)
        continue
      rows, images = self.model.render_owned(phi, len(ids), target.size, target.window)
      for row, image in zip(rows, pixels.to_uint8(images)):
        self._pending.append(self._pool.submit(_save_png, image, folder / f"{ids[row]}.png"))
      self.written += len(rows)
      self._progress.update(len(ids))
      while len(self._pending) > 64:  # bound the images waiting for the encoder threads
        self._pending.pop(0).result()

  def _stream(self, folder: epath.Path, phi: jax.Array, ids: np.ndarray,
              size: tuple[int, int]) -> None:
    model = self.model
    for row, i in enumerate(ids):
      owner = int(i) % jax.process_count()
      with tqdm(total=stream.num_tiles(size, model.renderer.tile), desc=f"{i}.tif", unit="tile",
                disable=jax.process_index() != owner) as progress:
        stream.write_bigtiff(folder / f"{i}.tif", model.renderer, {"params": model.ae_params},
                             model.phi_row(phi, row), size, owner=owner, progress=progress)
      self.written += owner == jax.process_index()
      self._progress.update(1)
