"""The samplers on 2 processes x 2 CPU devices (jax.distributed) == on 1 process x 4 devices."""

import os
import subprocess
import sys

import numpy as np
import portpicker

from tests import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_samplers_on_two_processes_match_one_process():
  worker = [sys.executable, "-m", "tests.sampler_multiprocess_worker"]
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  workers = [processes.Worker(worker + [address, "2", str(i)], processes.cpu_env(2, optimize=False), ROOT)
             for i in range(2)]
  single = subprocess.run(worker, env=processes.cpu_env(4, optimize=False), cwd=ROOT, capture_output=True,
                          text=True, timeout=240, check=True)
  outs = processes.finish_all(workers, 240)
  one, two = processes.result(single.stdout), [processes.result(out) for out, _ in outs]
  assert one["devices"] == 4 and all(r["devices"] == 4 for r in two)
  for key in one:
    if key != "devices":
      np.testing.assert_allclose(two[0][key], one[key], rtol=1e-5, atol=1e-5, err_msg=key)
      np.testing.assert_array_equal(two[0][key], two[1][key], err_msg=key)
