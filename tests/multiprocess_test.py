"""Two local processes x 2 CPU devices (jax.distributed on 127.0.0.1) == one process x 4 devices,
and a newest checkpoint that only one of them cannot read is set aside by both."""

import os
import subprocess
import sys

import numpy as np
import portpicker

from tests import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_match_one_process(tmp_path):
  steps = "4"
  single = subprocess.run([sys.executable, "-m", "tests.multiprocess_worker", str(tmp_path / "one"),
                           steps], env=processes.cpu_env(4, optimize=False), cwd=ROOT, capture_output=True,
                          text=True, timeout=240, check=True)
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  workers = [processes.Worker([sys.executable, "-m", "tests.multiprocess_worker",
                               str(tmp_path / "two"), steps, address, "2", str(i)],
                              processes.cpu_env(2, optimize=False), ROOT)
             for i in range(2)]
  one = processes.result(single.stdout)
  two = [processes.result(out) for out, _ in processes.finish_all(workers, 240)]
  assert one["devices"] == 4 and all(r["devices"] == 4 for r in two)
  np.testing.assert_allclose(two[0]["w"], one["w"], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(two[0]["w"], two[1]["w"])
  # One shared checkpoint, with each process's data-iterator position in it.
  assert (tmp_path / "two" / "checkpoints_toy" / "4.unreadable" / "data_iter" /
          "process_1-of-2.json").is_file()
  # Step 4 was unreadable on the last process alone: both set it aside and resumed from 2.
  for r in (one, *two):
    assert r["resumed"] == ["2"] and r["folder"] == ["2", "4", "4.unreadable", "6"], r
  np.testing.assert_allclose(two[0]["resumed_w"], one["resumed_w"], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(two[0]["resumed_w"], two[1]["resumed_w"])
  assert np.abs(np.subtract(one["resumed_w"], one["w"])).max() > 0  # it trained on
