"""One process of the multi-process test: trains the toy task, prints final weights as JSON.

Then the newest checkpoint is damaged where only the last process reads it (its own
data-iterator state), and training resumes: every process must take the same
decision (set the step aside, resume from the previous one) instead of hanging.

Usage: python -m tests.multiprocess_worker WORKDIR STEPS [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import json
import logging
import os
import re
import sys

import jax


def main(argv: list[str]) -> None:
  workdir, steps = argv[1], int(argv[2])
  if len(argv) > 3:
    jax.distributed.initialize(coordinator_address=argv[3], num_processes=int(argv[4]),
                               process_id=int(argv[5]), cluster_detection_method="deactivate")
    from tests import processes  # pylint: disable=g-import-not-at-top
    processes.cache_compiles_of_every_process()
  from configs import tiny  # pylint: disable=g-import-not-at-top  (after distributed init)
  from infd_jax import sharding, trained  # pylint: disable=g-import-not-at-top
  from infd_jax.evaluation import writers  # pylint: disable=g-import-not-at-top
  from infd_jax.training import loop  # pylint: disable=g-import-not-at-top
  from tests import toy_task  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  config.train.update(log_every=1, ckpt_every=2)
  mesh = sharding.make_mesh(-1, 1)
  writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
  state = loop.train(config, workdir, toy_task.make_task(steps, mesh=mesh, shuffle=False), mesh,
                     writer)
  gather = lambda s: jax.experimental.multihost_utils.process_allgather(
      s.params["w"], tiled=True).ravel().tolist()
  result = {"process": jax.process_index(), "devices": jax.device_count(), "w": gather(state)}

  folder = trained.stage_dir(workdir, "toy")
  last = jax.process_count() - 1
  sharding.barrier("trained")
  if jax.process_index() == 0:  # not valid UTF-8: the iterator state fails to decode
    (folder / str(steps) / "data_iter" / f"process_{last}-of-{jax.process_count()}.json"
     ).write_bytes(b"\xff\xfe not a saved iterator")
  sharding.barrier("damaged")
  resumed = []
  handler = logging.Handler()
  handler.emit = lambda r: resumed.extend(re.findall(r"resumed from step (\d+)", r.getMessage()))
  logging.getLogger().addHandler(handler)
  state = loop.train(config, workdir, toy_task.make_task(steps + 2, mesh=mesh, shuffle=False),
                     mesh, writer)
  result.update(resumed_w=gather(state), resumed=resumed, folder=sorted(os.listdir(folder)))
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main(sys.argv)
