"""One process of the multi-process test: trains the toy task, prints final weights as JSON.

Usage: python -m tests.multiprocess_worker WORKDIR STEPS [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

import json
import sys

import jax


def main(argv: list[str]) -> None:
  workdir, steps = argv[1], int(argv[2])
  if len(argv) > 3:
    jax.distributed.initialize(coordinator_address=argv[3], num_processes=int(argv[4]),
                               process_id=int(argv[5]), cluster_detection_method="deactivate")
  from infd_jax.configs import tiny  # pylint: disable=g-import-not-at-top  (after distributed init)
  from infd_jax import sharding  # pylint: disable=g-import-not-at-top
  from infd_jax.evaluation import writers  # pylint: disable=g-import-not-at-top
  from infd_jax.training import loop  # pylint: disable=g-import-not-at-top
  from tests import toy_task  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  config.train.update(log_every=1, ckpt_every=2)
  mesh = sharding.make_mesh(-1, 1)
  writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)
  task = toy_task.make_task(steps, mesh=mesh, shuffle=False)
  state = loop.train(config, workdir, task, mesh, writer)
  w = jax.experimental.multihost_utils.process_allgather(state.params["w"], tiled=True)
  print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                                "w": w.ravel().tolist()}))


if __name__ == "__main__":
  main(sys.argv)
