"""One process of tests/condition_test.py: condition jobs on the tiny trained model.

Usage: python -m tests.condition_worker TRAINED OUT JOBS_JSON COORDINATOR NUM_PROCESSES ID

JOBS_JSON maps a job's name to its `condition` settings (regions as a JSON string,
init_image, start, fit_steps, ...). Each job writes 3 guided samples (seed 4) at
32 x 32 to OUT/<name>/p<process index>/32/, one folder per process, so the test
sees which process wrote which sample; the jobs run one after the other in this one
launch. The test's environment names its compilation cache (JAX_COMPILATION_CACHE_DIR).
"""

import json
import sys

import jax


def main(argv: list[str]) -> None:
  trained, out, jobs_json, address, num_processes, process_id = argv[1:7]
  jax.distributed.initialize(coordinator_address=address, num_processes=int(num_processes),
                             process_id=int(process_id), cluster_detection_method="deactivate")
  from tests import processes  # pylint: disable=g-import-not-at-top
  processes.cache_compiles_of_every_process()
  from infd_jax import jobs  # pylint: disable=g-import-not-at-top  (after distributed init)
  from configs import tiny  # pylint: disable=g-import-not-at-top

  for name, settings in json.loads(jobs_json).items():
    c = tiny.get_config()
    c.stage = "condition"
    c.ckpt.update(ae_checkpoint=trained, dm_checkpoint=trained)
    c.condition.update(settings, sizes=(32,), num_samples=3, batch_size=3, seed=4,
                       out_dir=f"{out}/{name}/p{jax.process_index()}")
    jobs.run(c, f"{out}/work")


if __name__ == "__main__":
  main(sys.argv)
