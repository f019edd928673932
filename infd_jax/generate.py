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

import json
import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from infd_jax import inference, sample_writer

log = logging.getLogger(__name__)


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
        mesh: jax.sharding.Mesh) -> epath.Path:
  """Samples `sample.num_samples` images at every size in `sample.sizes`.

  Returns:
    The output folder.
  """
  sc = config.sample
  targets = sample_writer.plan(sc.sizes, sc.window, stream_above=sc.stream_above, tile=sc.tile,
                               name="config.sample")
  out_dir = epath.Path(sc.out_dir or epath.Path(workdir) / "samples")
  model = inference.load_model(config, workdir, mesh)
  started = time.perf_counter()
  with sample_writer.SampleWriter(model, out_dir, targets, sc.num_samples) as writer:
    for start in range(0, sc.num_samples, sc.batch_size):
      ids = np.arange(start, min(start + sc.batch_size, sc.num_samples))
      writer.write(model.decode_global(model.sample_global(ids, sc.seed)), ids)
  log.info("process %d wrote %d of %d images (%s) in %.1fs to %s", jax.process_index(),
               writer.written, sc.num_samples * len(targets), [t.folder for t in targets],
               time.perf_counter() - started, out_dir)
  return out_dir


def run_t2i(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
            mesh: jax.sharding.Mesh) -> epath.Path:
  """`sample.num_samples` images of each of `t2i.prompts` at every size in `sample.sizes`.

  Sample k * num_samples + j is copy j of prompt k (`<out_dir>/prompts.json` maps ids
  to prompts); the folders and files are those of `run`.

  Returns:
    The output folder (default `<workdir>/samples_t2i`).
  """
  sc = config.sample
  targets = sample_writer.plan(sc.sizes, sc.window, stream_above=sc.stream_above, tile=sc.tile,
                               name="config.sample")
  out_dir = epath.Path(sc.out_dir or epath.Path(workdir) / "samples_t2i")
  model = inference.load_t2i_model(config, workdir, mesh)
  tokens = model.prompt_tokens(list(config.t2i.prompts), sc.num_samples)
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = {i: p for i, p in enumerate(np.repeat(list(config.t2i.prompts), sc.num_samples))}
    (out_dir / "prompts.json").write_text(json.dumps(
        {str(i): str(p) for i, p in prompts.items()}, indent=1))
  with sample_writer.SampleWriter(model, out_dir, targets, len(tokens)) as writer:
    for start in range(0, len(tokens), sc.batch_size):
      ids = np.arange(start, min(start + sc.batch_size, len(tokens)))
      z = model.generate_global(tokens[ids], ids, sc.seed, config.t2i.guidance_scale)
      writer.write(model.decode_global(z), ids)
  log.info("process %d wrote %d images to %s", jax.process_index(), writer.written, out_dir)
  return out_dir
