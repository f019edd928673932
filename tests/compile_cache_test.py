"""Runs of the CLI on the tiny config: a repeated run compiles nothing (every program comes
from the persistent cache), the default log is quiet, and resuming with another
architecture is refused in one line naming the differing keys."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(workdir, cache, data, *extra, env=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **dict(env))
  return subprocess.run(
      [sys.executable, "-m", "infd_jax.main", "--config=tiny", f"--workdir={workdir}",
       f"--config.compile_cache={cache}", f"--config.data.data_dir={data}",
       "--config.train.ae_steps=1", *extra], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=900)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  out = _main(root / "first", root / "cache", root / "data")
  assert out.returncode == 0, out.stderr[-3000:]
  return root, out.stderr + out.stdout


def test_second_run_hits_the_cache(first_run):
  root, _ = first_run
  assert any(p.name.startswith("jit_step-") for p in (root / "cache").iterdir())
  # JAX_LOG_COMPILES makes jax log each persistent-cache hit as a warning.
  out = _main(root / "second", root / "cache", root / "data", env={"JAX_LOG_COMPILES": "1"})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Persistent compilation cache hit for 'jit_step'" in out.stderr, out.stderr[-3000:]


def test_default_log_is_quiet(first_run):
  root, log = first_run
  assert log.count("config:\n") == 1 and "[Hyperparameters]" not in log
  assert "[ae] compiling the training step" in log and "[ae] step 1 done" in log
  for noise in ("checkpoint_manager.py", "orbax", "Downloading and preparing", "libtpu",
                "dataset_builder.py"):
    assert noise not in log, noise
  assert list((root / "first" / "ae").glob("events.out.tfevents.*"))  # the stage's own run


def test_resume_with_another_architecture_names_the_keys(first_run):
  root, _ = first_run
  out = _main(root / "first", root / "cache", root / "data", "--config.ae.ch=64",
              "--config.train.ae_steps=4")
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("infd_jax: error:")]
  assert len(lines) == 1 and "ae.ch=64 (checkpoint 32)" in lines[0], out.stderr[-3000:]
