"""The generation job: DDIM latents -> quantize -> phi once -> any-resolution PNGs.

Writes `<out_dir>/<H>x<W>/<id>.png` (or `<out_dir>/<R>/<id>.png` for square
sizes, as the official `gen_samples.py`). Every requested size is rendered from
the same sampled latents with the official tiling (tile 256, context 8), so
memory stays bounded by the tile batch, not the image size.
"""

import logging
import pathlib
import time

import jax
import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from infd_jax.rendering import tiling
from infd_jax.training import ae_task, builders, dm_task


def parse_size(size: int | str) -> tuple[int, int]:
  """256 -> (256, 256); "480x640" -> (480, 640): sizes are H or HxW."""
  if isinstance(size, int) or str(size).isdigit():
    return int(size), int(size)
  try:
    h, w = (int(v) for v in str(size).lower().split("x"))
  except ValueError:
    raise builders.UserError(f"config.sample.sizes: {size!r} is not N or HxW") from None
  return h, w


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] -> uint8 with the official truncation: floor(clip(x/2 + 0.5, 0, 1) * 255)."""
  return np.floor(np.clip(images * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        mesh: jax.sharding.Mesh) -> pathlib.Path:
  """Samples `sample.num_samples` images at every size in `sample.sizes`.

  Returns:
    The output folder.
  """
  sc = config.sample
  workdir = pathlib.Path(workdir)
  out_dir = pathlib.Path(sc.out_dir or workdir / "samples")
  sizes = [parse_size(s) for s in sc.sizes]
  ae_params = ae_task.load_params(config, workdir, mesh)
  dm_params = dm_task.load_params(config, workdir, mesh)
  sample = dm_task.make_sampler(config, num=sc.batch_size, mesh=mesh)
  renderer = tiling.TiledRenderer(tiling.module_render_fn(builders.autoencoder(config), "render"),
                                  sc.tile, sc.pad, sc.tiles_per_call)
  num_batches = -(-sc.num_samples // sc.batch_size)
  progress = tqdm(total=sc.num_samples * len(sizes), desc="images", unit="img",
                  disable=jax.process_index() > 0)
  started = time.perf_counter()
  for b in range(num_batches):
    # Every process samples the same batch; process 0 writes it.
    phi = sample(dm_params, ae_params, jax.random.fold_in(jax.random.PRNGKey(sc.seed), b))
    ids = range(b * sc.batch_size, min((b + 1) * sc.batch_size, sc.num_samples))
    for h, w in sizes:
      images = to_uint8(renderer.render_image({"params": ae_params}, phi, (h, w)))
      folder = out_dir / (str(h) if h == w else f"{h}x{w}")
      if jax.process_index() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in zip(ids, images):
          Image.fromarray(image).save(folder / f"{i}.png")
      progress.update(len(ids))
  progress.close()
  logging.info("wrote %d samples at %s in %.1fs to %s", sc.num_samples, sizes,
               time.perf_counter() - started, out_dir)
  return out_dir
