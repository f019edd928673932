"""The `condition` stage: guided sampling from the regions of `config.condition`.

`condition.regions` is a list (a tuple of dicts in a config file, or a JSON list
on the command line) documented in `infd_jax.guidance.task`. Sample i is guided
from the noise of (seed, i) alone (`inference.Model.condition_global`, the path
the Python API `Model.condition` takes too), rendered at every size of
`condition.sizes` with the sampling tiling and written to
`<out_dir or workdir/condition>/<size>/<id>.png` by the process that holds it,
so every sample is written exactly once whatever the number of hosts.
"""

import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from infd_jax import checks, inference
from infd_jax.guidance import task as task_lib
from infd_jax.rendering import pixels


def _save_png(image: np.ndarray, path: epath.Path) -> None:
  with path.open("wb") as f:
    Image.fromarray(image).save(f, format="PNG")


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
        mesh: jax.sharding.Mesh) -> epath.Path:
  """Writes `condition.num_samples` guided samples at every size of `condition.sizes`."""
  cc = config.condition
  inference.check_count(cc.num_samples, "config.condition.num_samples")
  inference.check_count(cc.batch_size, "config.condition.batch_size")
  sizes = [checks.parse_size(s, "config.condition.sizes") for s in cc.sizes]
  task = task_lib.from_config(config)  # every region file is read before any model work
  model = inference.load_model(config, workdir, mesh)
  out_dir = epath.Path(cc.out_dir or epath.Path(workdir) / "condition")
  folders = [out_dir / (str(h) if h == w else f"{h}x{w}") for h, w in sizes]
  for folder in folders:
    folder.mkdir(parents=True, exist_ok=True)
  progress = tqdm(total=cc.num_samples, desc="guided samples", unit="img",
                  disable=jax.process_index() > 0)
  started, written = time.perf_counter(), 0
  for start in range(0, cc.num_samples, cc.batch_size):
    ids = np.arange(start, min(start + cc.batch_size, cc.num_samples))
    z, losses = model.condition_global(ids, cc.seed, task)
    losses = np.asarray(multihost_utils.process_allgather(losses, tiled=True))[:len(ids)]
    for k, c in enumerate(task.objective.conditions):
      logging.info("samples %d-%d: %s loss on %s of %s: %s", ids[0], ids[-1], c.kind, c.box,
                   c.size, np.round(losses[:, k], 4).tolist())
    phi = model.decode_global(z)
    for size, folder in zip(sizes, folders):
      rows, images = model.render_local(phi, size)
      keep = rows < len(ids)  # rows past the batch pad it to the device count
      for row, image in zip(rows[keep], pixels.to_uint8(images[keep])):
        _save_png(image, folder / f"{ids[row]}.png")
      written += int(keep.sum())
    progress.update(len(ids))
  progress.close()
  logging.info("process %d wrote %d images of %d guided samples at %s in %.1fs to %s",
               jax.process_index(), written, cc.num_samples, sizes,
               time.perf_counter() - started, out_dir)
  return out_dir
