"""Pod behaviour on CPU: the real `ae` and `dm` stages on 2 processes x 2 devices
(jax.distributed on 127.0.0.1) equal 1 process x 4 devices, on 9 records (shares of
5 and 4), with the latent cache and validation; checkpoints resume 2 -> 1 and 1 -> 2."""

import os
import shutil
import subprocess
import sys

import numpy as np
import portpicker
import pytest

from infd_jax.data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AE_STEPS, DM_STEPS = 2, 2


def _env(devices: int) -> dict[str, str]:
  import jax  # pylint: disable=g-import-not-at-top
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _run(workdir, data_dir, stages, ae_steps, dm_steps, processes):
  """Runs the worker on 1 process x 4 devices or 2 processes x 2 devices; returns stderr."""
  args = [sys.executable, "-m", "tests.pod_worker", str(workdir), str(data_dir), stages,
          str(ae_steps), str(dm_steps)]
  if processes == 1:
    procs = [subprocess.Popen(args, env=_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
  else:
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    procs = [subprocess.Popen(args + [address, "2", str(i)], env=_env(2), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return outs[0][1]


def _params(workdir, stage):
  with np.load(workdir / f"params_{stage}.npz") as f:
    return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def _val(workdir, tag):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  values = {}
  for events in workdir.glob("events.out.tfevents.*"):
    acc = event_accumulator.EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    if tag in acc.Tags()["tensors"]:
      values.update({e.step: float(e.tensor_proto.float_val[0]) for e in acc.Tensors(tag)})
  return values


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  data = tmp_path_factory.mktemp("data")
  prepare.prepare("demo", str(data))  # 9 photos, shared by every run
  one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
  _run(one, data, "ae,dm", AE_STEPS, DM_STEPS, 1)
  _run(two, data, "ae,dm", AE_STEPS, DM_STEPS, 2)
  return data, one, two


def test_two_processes_train_both_stages_like_one(runs):
  _, one, two = runs
  for stage in ("ae", "dm"):
    a, b = _params(one, stage), _params(two, stage)
    assert len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_allclose(y, x, rtol=2e-4, atol=2e-5)
  # Validation sees the same 9 examples and crops whatever the layout; a dropped or
  # doubled example (shares of 5 and 4, local batch 4) would move these means.
  for tag in ("val/l1_loss", "val/psnr", "val/perc_loss"):
    v1, v2 = _val(one, tag), _val(two, tag)
    assert set(v1) == {AE_STEPS} and set(v2) == {AE_STEPS}, (v1, v2)
    np.testing.assert_allclose(v2[AE_STEPS], v1[AE_STEPS], rtol=1e-4)
  # One latent cache written by both processes (5 + 4 latents), complete.
  caches = [d for d in (two / "latents").iterdir() if (d / "meta.json").exists()]
  assert len(caches) == 1
  rows = sum(len(np.load(f)) for f in caches[0].glob("p*.npy"))
  assert rows == 9


@pytest.mark.parametrize("src,processes", [("two", 1), ("one", 2)])
def test_resume_on_another_process_count(runs, tmp_path, src, processes):
  data, one, two = runs
  workdir = tmp_path / "resumed"
  shutil.copytree({"one": one, "two": two}[src], workdir)
  err = _run(workdir, data, "ae", AE_STEPS + 1, DM_STEPS, processes)
  assert f"resumed from step {AE_STEPS}" in err
  assert f"written by {2 if processes == 1 else 1} processes" in err
  assert (workdir / "checkpoints_ae" / str(AE_STEPS + 1)).is_dir()
