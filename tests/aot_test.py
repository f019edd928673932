"""The AOT fit check on the CPU backend (TPU topologies need libtpu and minutes: never here)."""

import json
import pathlib
import re
import subprocess
import sys

from etils import epath
import jax
import numpy as np
import pytest

from infd_jax.configs import tiny
from infd_jax import aot
from infd_jax import builders, sharding
from infd_jax.training import dm_task

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_compiles_the_tiny_dm_step_once_and_skips_it_on_rerun(tmp_path):
  config = tiny.get_config("stage=dm")
  config.dm.update(channel_mult=(1,), num_res_blocks=1, attention_resolutions=())  # fast compile
  results = epath.Path(tmp_path) / "aot.jsonl"
  run = lambda: aot.run(config, config_path="configs/tiny.py", overrides=[], topology="cpu",
                        batch=0, results=results)
  (record,) = run()
  assert record["program"] == "dm_step" and record["chips"] == 8 and record["batch"] == 8
  assert record["flops"] > 0 and record["bytes_accessed"] > 0 and record["fits"] is None
  # Arguments per device: the replicated state (mesh.fsdp = 1) and 1/8 of the latents.
  state = jax.eval_shape(dm_task.init_fn(config), jax.random.PRNGKey(0))
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  z_bytes = 8 * int(np.prod(builders.latent_shape(config))) * 4
  assert record["argument_bytes"] == state_bytes + z_bytes // 8
  assert record["total_bytes"] == (record["argument_bytes"] + record["output_bytes"]
                                   + record["temp_bytes"] - record["alias_bytes"])
  assert run() == [] and len(results.read_text().splitlines()) == 1
  assert json.loads(results.read_text())["key"] == record["key"]


def test_render_program_is_one_call_of_the_models_tiled_renderer():
  config = tiny.get_config("stage=sample")
  mesh = sharding.make_mesh(-1, 1)
  program = aot.render_program(config, 2, mesh)
  compiled, _ = aot.compile_program(program)
  n, side = config.sample.tiles_per_call, config.sample.tile + 2 * config.sample.pad
  out = compiled.memory_analysis().output_size_in_bytes
  assert out == -(-n // 8) * 8 * 2 * side * side * 3 * 4  # [tiles, batch, h, w, RGB] float32


@pytest.mark.parametrize("topology,batch,message", [
    ("v9x:2x2", 0, "--topology='v9x:2x2'"),
    ("cpu", 6, "--batch=6 does not divide over the 8 devices"),
])
def test_bad_input_is_a_user_error(topology, batch, message, tmp_path):
  with pytest.raises(builders.UserError, match=re.escape(message)):
    aot.run(tiny.get_config(), config_path="configs/tiny.py", overrides=[], topology=topology,
            batch=batch, results=epath.Path(tmp_path) / "r.jsonl")


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "infd_jax.aot", "--config=configs/tiny.py", "--topology=v5p-8",
       f"--results={tmp_path}/r.jsonl"], cwd=ROOT, capture_output=True, text=True,
      timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "--topology='v5p-8'" in lines[0], proc.stderr
