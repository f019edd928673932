"""One process of tests/condition_test.py: guided sampling on the tiny trained model.

Usage: python -m tests.condition_worker TRAINED OUT JOBS_JSON [COORDINATOR NUM_PROCESSES ID]

JOBS_JSON maps a name to `condition` settings (regions as a JSON string, init_image,
start, fit_steps, ...). With a coordinator, each is a `condition` job that writes 3 guided
samples (seed 4) at 32 x 32 to OUT/<name>/p<process index>/32/, one folder per process,
so the test sees which process wrote which sample; the jobs run one after the other in
this one launch. Without one, this process calls the Python API on its devices instead:
per name `Model.condition` of the regions (3 samples, seed 4, the other settings as
keywords) and `Model.render` of its latents at 32 x 32, saved to OUT/api.npz as
`<name>_latents`, `<name>_losses` and `<name>_images`. The test's environment names its
compilation cache (JAX_COMPILATION_CACHE_DIR).
"""

import json
import sys

import jax

N, SEED, SIZE = 3, 4, 32


def _jobs(trained: str, out: str, jobs_json: str) -> None:
  from infd_jax import jobs  # pylint: disable=g-import-not-at-top  (after distributed init)
  from configs import tiny  # pylint: disable=g-import-not-at-top

  for name, settings in json.loads(jobs_json).items():
    c = tiny.get_config()
    c.stage = "condition"
    c.ckpt.update(ae_checkpoint=trained, dm_checkpoint=trained)
    c.condition.update(settings, sizes=(SIZE,), num_samples=N, batch_size=N, seed=SEED,
                       out_dir=f"{out}/{name}/p{jax.process_index()}")
    jobs.run(c, f"{out}/work")


def _api(trained: str, out: str, jobs_json: str) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import infd_jax  # pylint: disable=g-import-not-at-top

  model, arrays = infd_jax.load(trained), {}
  for name, settings in json.loads(jobs_json).items():
    settings = dict(settings)
    z, losses = model.condition(json.loads(settings.pop("regions")), n=N, seed=SEED, **settings)
    arrays.update({f"{name}_latents": z, f"{name}_losses": losses,
                   f"{name}_images": model.render(z, (SIZE, SIZE))})
  np.savez(f"{out}/api.npz", **arrays)


def main(argv: list[str]) -> None:
  trained, out, jobs_json = argv[1:4]
  if len(argv) == 4:
    _api(trained, out, jobs_json)
    return
  address, num_processes, process_id = argv[4:7]
  jax.distributed.initialize(coordinator_address=address, num_processes=int(num_processes),
                             process_id=int(process_id), cluster_detection_method="deactivate")
  from tests import processes  # pylint: disable=g-import-not-at-top
  processes.cache_compiles_of_every_process()
  _jobs(trained, out, jobs_json)


if __name__ == "__main__":
  main(sys.argv)
