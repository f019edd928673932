"""Importing the package changes no global state: no flags defined or parsed, no stand-in
modules, no writer factories, no log handlers or filters (subprocess, a fresh interpreter;
the libraries it uses are imported first, with whatever state they set up themselves)."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

_PROBE = """
import json, logging, sys
from absl import flags
from tensorboardX import record_writer
import clu.metrics, grain, jax, orbax.checkpoint, tensorflow_datasets  # their own state first
before = dict(flags=sorted(flags.FLAGS), factories=sorted(record_writer.REGISTERED_FACTORIES),
              handlers=len(logging.getLogger().handlers), modules=set(sys.modules))
import infd_jax, infd_jax.main, infd_jax.aot, infd_jax.jobs, infd_jax.data.pipeline
import infd_jax.evaluation.writers, infd_jax.training.loop, infd_jax.trained
root = logging.getLogger()
print("RESULT " + json.dumps(dict(
    flags=sorted(set(flags.FLAGS) - set(before["flags"])), parsed=flags.FLAGS.is_parsed(),
    factories=sorted(set(record_writer.REGISTERED_FACTORIES) - set(before["factories"])),
    handlers=len(root.handlers) - before["handlers"],
    filters=[len(h.filters) for h in root.handlers] + [len(root.filters)],
    stand_ins=sorted(m for m in set(sys.modules) - before["modules"]
                     if m.startswith("clu.metric_writers")))))
"""


def test_importing_the_package_changes_no_global_state():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout
  result = json.loads(out.split("RESULT ")[-1])
  # Libraries define their own absl flags when imported; the tools' flags come when they run.
  assert not set(result["flags"]) & {"config", "workdir", "coordinator_address", "num_processes",
                                     "process_id", "multihost", "topology", "batch", "results"}
  assert result == dict(result, parsed=False, factories=[], handlers=0, stand_ins=[]), result
  assert not any(result["filters"]), result
