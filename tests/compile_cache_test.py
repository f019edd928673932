"""A repeated run compiles nothing (every program comes from the persistent cache), and
the default log is quiet: no library INFO, the config once, a line while compiling."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _train(workdir, cache, data):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "infd_jax.main", "--config=tiny", f"--workdir={workdir}",
       f"--config.compile_cache={cache}", f"--config.data.data_dir={data}",
       "--config.train.ae_steps=2"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stderr + out.stdout


def _entries(cache: pathlib.Path) -> set[str]:
  return {p.name for p in cache.iterdir() if not p.name.endswith("-atime")}


def test_second_run_hits_the_cache_and_logs_are_quiet(tmp_path):
  cache, data = tmp_path / "cache", tmp_path / "data"
  log = _train(tmp_path / "first", cache, data)
  first = _entries(cache)
  assert first, "the first run cached no program"
  _train(tmp_path / "second", cache, data)
  assert _entries(cache) == first  # nothing new was compiled and stored

  assert log.count("config:\n") == 1 and "[Hyperparameters]" not in log
  assert "[ae] compiling the training step" in log and "[ae] step 1 done" in log
  for noise in ("checkpoint_manager.py", "orbax", "Downloading and preparing", "libtpu",
                "dataset_builder.py"):
    assert noise not in log, noise
  assert (tmp_path / "first" / "ae").is_dir()  # the stage's own TensorBoard run
