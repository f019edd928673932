"""The generation job: latents -> quantize -> phi once -> any-resolution images.

Writes `<out_dir>/<H>x<W>/<id>.png` (or `<out_dir>/<R>/<id>.png` for square
sizes, as the official `gen_samples.py`). Every requested size is rendered from
the same latents with the official tiling (tile 256, context 8).

Sample i is the same image for the same seed on any number of hosts (its noise
depends on (seed, i) only), and `sample_writer` writes it exactly once: each
process writes the images it owns, PNG encoding on a small thread pool. Sizes
above `sample.stream_above` pixels a side stream tile by tile into a pyramidal
BigTIFF `<id>.tif` (host memory bounded by the tile batch); `sample.window`
renders one region (top, left, height, width) of a virtual image of any size.
"""

import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from infd_jax import checks, inference, sample_writer


def check_settings(config: ml_collections.ConfigDict) -> list[sample_writer.Target]:
  """Every sampling setting checked before any model work: the outputs to write."""
  sc = config.sample
  checks.check_count(sc.num_samples, "config.sample.num_samples")
  checks.check_count(sc.batch_size, "config.sample.batch_size")
  return sample_writer.plan(sc.sizes, sc.window, stream_above=sc.stream_above, tile=sc.tile,
                            name="config.sample")


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
        mesh: jax.sharding.Mesh) -> epath.Path:
  """Samples `sample.num_samples` images at every size in `sample.sizes`.

  Returns:
    The output folder.
  """
  sc = config.sample
  targets = check_settings(config)
  out_dir = epath.Path(sc.out_dir or epath.Path(workdir) / "samples")
  model = inference.load_model(config, workdir, mesh)
  started = time.perf_counter()
  with sample_writer.SampleWriter(model, out_dir, targets, sc.num_samples) as writer:
    for start in range(0, sc.num_samples, sc.batch_size):
      ids = np.arange(start, min(start + sc.batch_size, sc.num_samples))
      writer.write(model.decode_global(model.sample_global(ids, sc.seed)), ids)
  logging.info("process %d wrote %d of %d images (%s) in %.1fs to %s", jax.process_index(),
               writer.written, sc.num_samples * len(targets), [t.folder for t in targets],
               time.perf_counter() - started, out_dir)
  return out_dir
