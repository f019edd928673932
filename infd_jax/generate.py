"""The generation job: latents -> quantize -> phi once -> any-resolution images.

Writes `<out_dir>/<H>x<W>/<id>.png` (or `<out_dir>/<R>/<id>.png` for square
sizes, as the official `gen_samples.py`). Every requested size is rendered from
the same latents with the official tiling (tile 256, context 8).

Data parallel: each batch of latents and its phi are sharded over the mesh, each
device renders its own images, and each process writes the images it holds
(PNG encoding on a small thread pool), so N samples are written exactly once
whatever the number of hosts. Sample i is the same image for the same seed on
any number of hosts (its noise depends on (seed, i) only). Sizes above
`sample.stream_above` pixels a side stream tile by tile into a pyramidal
BigTIFF `<id>.tif` (host memory bounded by the tile batch); `sample.window`
renders one region (top, left, height, width) of a virtual image of any size.
"""

import concurrent.futures
import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image
from tqdm import tqdm

from infd_jax import builders, checks, inference
from infd_jax.rendering import pixels, stream

def check_settings(config: ml_collections.ConfigDict
                   ) -> list[tuple[tuple[int, int], tuple[int, int, int, int] | None]]:
  """Every sampling setting checked before any model work: [(size, window)]."""
  sc = config.sample
  inference.check_count(sc.num_samples, "config.sample.num_samples")
  inference.check_count(sc.batch_size, "config.sample.batch_size")
  if isinstance(sc.sizes, (str, int)) or not sc.sizes:
    raise builders.UserError(f"config.sample.sizes={sc.sizes!r}: give a tuple of sizes, "
                             "e.g. '(256, 1024, \"720x1280\")'")
  plan = []
  for s in sc.sizes:
    size = checks.parse_size(s, name="config.sample.sizes")
    window = inference.parse_window(tuple(sc.window), size, name="config.sample.window")
    if _streamed(config, size, window) and sc.tile % 16:
      raise builders.UserError(f"config.sample.tile={sc.tile}: a streamed BigTIFF needs a "
                               "multiple of 16")
    plan.append((size, window))
  return plan


def _streamed(config: ml_collections.ConfigDict, size: tuple[int, int], window) -> bool:
  return window is None and size[0] * size[1] > config.sample.stream_above ** 2


def _folder(out_dir: epath.Path, size: tuple[int, int], window) -> epath.Path:
  h, w = size
  name = str(h) if h == w else f"{h}x{w}"
  if window is not None:
    name += "_window_{}_{}_{}x{}".format(*window)
  return out_dir / name


def _save_png(image: np.ndarray, path: epath.Path) -> None:
  with path.open("wb") as f:
    Image.fromarray(image).save(f, format="PNG")


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
        mesh: jax.sharding.Mesh) -> epath.Path:
  """Samples `sample.num_samples` images at every size in `sample.sizes`.

  Returns:
    The output folder.
  """
  sc = config.sample
  plan = check_settings(config)
  out_dir = epath.Path(sc.out_dir or epath.Path(workdir) / "samples")
  model = inference.load_model(config, workdir, mesh)
  for size, window in plan:
    _folder(out_dir, size, window).mkdir(parents=True, exist_ok=True)
  total = sc.num_samples * len(plan)
  progress = tqdm(total=total, desc="images", unit="img", disable=jax.process_index() > 0)
  started = time.perf_counter()
  written = 0
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    pending: list[concurrent.futures.Future] = []
    for start in range(0, sc.num_samples, sc.batch_size):
      ids = np.arange(start, min(start + sc.batch_size, sc.num_samples))
      phi = model.decode_global(model.sample_global(ids, sc.seed))
      for size, window in plan:
        folder = _folder(out_dir, size, window)
        if _streamed(config, size, window):
          for row, i in enumerate(ids):
            owner = int(i) % jax.process_count()
            with tqdm(total=stream.num_tiles(size, sc.tile), desc=f"{i}.tif", unit="tile",
                      disable=jax.process_index() != owner) as tiles:
              stream.write_bigtiff(folder / f"{i}.tif", model.renderer,
                                   {"params": model.ae_params}, model.phi_row(phi, row), size,
                                   owner=owner, progress=tiles)
            written += owner == jax.process_index()
            progress.update(1)
          continue
        rows, images = model.render_local(phi, size, window)
        keep = rows < len(ids)  # rows past the batch pad it to the device count
        for row, image in zip(rows[keep], pixels.to_uint8(images[keep])):
          pending.append(pool.submit(_save_png, image, folder / f"{ids[row]}.png"))
        written += int(keep.sum())
        progress.update(len(ids))
        while len(pending) > 64:  # bound the images waiting for the encoder threads
          pending.pop(0).result()
    for future in pending:
      future.result()
  progress.close()
  logging.info("process %d wrote %d of %d images (%s) in %.1fs to %s", jax.process_index(),
               written, total, [s for s, _ in plan], time.perf_counter() - started, out_dir)
  return out_dir
