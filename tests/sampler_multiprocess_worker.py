"""One process of tests/sampler_multiprocess_test.py: every sampler on a batch over all devices.

  python -m tests.sampler_multiprocess_worker [coordinator num_processes process_id]
"""

import json
import os
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from infd_jax.diffusion import samplers, schedules


def _eps(params, x, t):
  return params * jnp.tanh(x) + jnp.cos(t.astype(jnp.float32) / 300.0)[:, None, None, None]


def main(argv: list[str]) -> None:
  # The test session's persistent compilation cache (tests/conftest.py), reused across runs.
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "INFD_TEST_JAX_CACHE", str(pathlib.Path(tempfile.gettempdir()) / "infd_jax_test_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if len(argv) > 1:
    jax.distributed.initialize(coordinator_address=argv[1], num_processes=int(argv[2]),
                               process_id=int(argv[3]), cluster_detection_method="deactivate")
    from tests import processes  # pylint: disable=g-import-not-at-top
    processes.cache_compiles_of_every_process()
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sched = schedules.linear_schedule()
  out = {"devices": jax.device_count()}
  # 8 rows split over the 4 devices; 6 rows do not divide, so they stay replicated.
  for name, num in (("ddim", 8), ("dpmpp_2m", 8), ("unipc", 6)):
    batch = NamedSharding(mesh, P("data")) if num % mesh.size == 0 else None
    fn = jax.jit(lambda key: samplers.sample(  # pylint: disable=cell-var-from-loop
        name, _eps, jnp.float32(0.5), key, (num, 4, 4, 3), sched, num_steps=4, eta=1.0,
        spacing="logsnr", batch_sharding=batch), out_shardings=NamedSharding(mesh, P()))
    out[f"{name}_{num}"] = np.asarray(fn(jax.random.key(7)).addressable_data(0)).tolist()
  print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
  main(sys.argv)
