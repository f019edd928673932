"""The `condition` stage: guided sampling from the regions of `config.condition`.

`condition.regions` is a list (a tuple of dicts in a config file, or a JSON list
on the command line) documented in `infd_jax.guidance.task`. Sample i is guided
from the noise of (seed, i) alone (`Model.condition_global`, the path the
Python API `Model.condition` takes too), rendered at every size of
`condition.sizes` (or `condition.window` of each) with the sampling tiling and
written to `<out_dir or workdir/condition>/<size>/<id>.png` by
`sample_writer`, as the generation job writes samples: every sample exactly
once whatever the number of hosts, large sizes streamed into BigTIFFs.
"""

import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from infd_jax import checks, inference, sample_writer, sharding
from infd_jax.guidance import task as task_lib


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
        mesh: jax.sharding.Mesh) -> epath.Path:
  """Writes `condition.num_samples` guided samples at every size of `condition.sizes`."""
  cc, sc = config.condition, config.sample
  checks.check_count(cc.num_samples, "config.condition.num_samples")
  checks.check_count(cc.batch_size, "config.condition.batch_size")
  targets = sample_writer.plan(cc.sizes, cc.window, stream_above=sc.stream_above, tile=sc.tile,
                               name="config.condition")
  task = task_lib.from_config(config)  # every region file is read before any model work
  model = inference.load_model(config, workdir, mesh)
  out_dir = epath.Path(cc.out_dir or epath.Path(workdir) / "condition")
  started = time.perf_counter()
  with sample_writer.SampleWriter(model, out_dir, targets, cc.num_samples,
                                  desc="guided samples") as writer:
    for start in range(0, cc.num_samples, cc.batch_size):
      ids = np.arange(start, min(start + cc.batch_size, cc.num_samples))
      z, losses = model.condition_global(ids, cc.seed, task)
      sharding.barrier("guided samples")  # a peer still compiling must not time out the gather
      losses = np.asarray(multihost_utils.process_allgather(losses, tiled=True))[:len(ids)]
      for k, c in enumerate(task.objective.conditions):
        logging.info("samples %d-%d: %s loss on %s of %s: %s", ids[0], ids[-1], c.kind, c.box,
                     c.size, np.round(losses[:, k], 4).tolist())
      writer.write(model.decode_global(z), ids)
  logging.info("process %d wrote %d images of %d guided samples at %s in %.1fs to %s",
               jax.process_index(), writer.written, cc.num_samples,
               [t.folder for t in targets], time.perf_counter() - started, out_dir)
  return out_dir
