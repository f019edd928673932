"""One process of tests/condition_test.py: the condition job on the tiny trained model.

Usage: python -m tests.condition_worker TRAINED OUT REGIONS_JSON COORDINATOR NUM_PROCESSES ID

Writes 3 guided samples (seed 4) at 32 x 32 to OUT/p<process index>/32/, one
folder per process, so the test sees which process wrote which sample. The
test's environment names its compilation cache (JAX_COMPILATION_CACHE_DIR).
"""

import sys

import jax


def main(argv: list[str]) -> None:
  trained, out, regions, address, num_processes, process_id = argv[1:7]
  jax.distributed.initialize(coordinator_address=address, num_processes=int(num_processes),
                             process_id=int(process_id), cluster_detection_method="deactivate")
  from infd_jax import jobs  # pylint: disable=g-import-not-at-top  (after distributed init)
  from configs import tiny  # pylint: disable=g-import-not-at-top

  c = tiny.get_config()
  c.stage = "condition"
  c.ckpt.update(ae_checkpoint=trained, dm_checkpoint=trained)
  c.condition.update(regions=regions, sizes=(32,), num_samples=3, batch_size=3, seed=4,
                     out_dir=f"{out}/p{jax.process_index()}")
  jobs.run(c, f"{out}/work")


if __name__ == "__main__":
  main(sys.argv)
