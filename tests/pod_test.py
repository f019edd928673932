"""Pod behaviour on CPU: the real `ae` and `dm` stages on 2 processes x 2 devices
(jax.distributed on 127.0.0.1) with resumes 2 -> 1 and 1 -> 2 processes, and past a corrupt
newest checkpoint, end equal to a straight 1 process x 4 devices run, on 9 records (shares
of 5 and 4), with the latent cache and validation."""

import os
import shutil
import sys

import numpy as np
import portpicker
import pytest

from infd_jax.data import prepare
from tests import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, data_dir, stages, ae_steps, dm_steps, count):
  """Runs the worker on 1 process x 4 devices or 2 processes x 2 devices; returns the stderr
  of each process."""
  args = [sys.executable, "-m", "tests.pod_worker", str(workdir), str(data_dir), stages,
          str(ae_steps), str(dm_steps)]
  if count == 1:
    launches = [(args, processes.cpu_env(4, optimize=False))]
  else:
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    launches = [(args + [address, "2", str(i)], processes.cpu_env(2, optimize=False))
                for i in range(2)]
  outs = processes.finish_all([processes.Worker(a, env, ROOT) for a, env in launches], 900)
  return [err for _, err in outs]


def _params(workdir, name):
  """(parameter leaves in order, step, rng) that the worker saved as `name`."""
  with np.load(workdir / name) as f:
    leaves = [f[k] for k in sorted((k for k in f.files if k.startswith("arr_")),
                                   key=lambda k: int(k.split("_")[1]))]
    return leaves, int(f["step"]), f["rng"]


def _val(workdir, tag):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  values = {}
  for events in workdir.glob("*/events.out.tfevents.*"):  # one run per stage: ae/, dm/
    acc = event_accumulator.EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    if tag in acc.Tags()["scalars"]:
      values.update({e.step: e.value for e in acc.Scalars(tag)})
  return values


def _corrupt_data(step_dir):
  """Flips one byte in the middle of every data file of a saved state (a failed checksum)."""
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and not f.name.startswith("_"):
      data = bytearray(f.read_bytes())
      data[len(data) // 2] ^= 0xFF
      f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A: 1 x 4 devices trains ae 2 + dm 2 steps straight. Pod: ae step 1 on 2 x 2 devices,
  ae step 2 and dm step 1 on 1 x 4 (resume 2 -> 1); then, with ae step 2 damaged, 2 x 2
  sets it aside, retrains it from step 1 and trains dm step 2 (resume 1 -> 2, latent cache
  rebuilt by both processes). The global data order makes both end equal.

  The pod's ae parameters after the resume 2 -> 1 are kept as `params_ae_2to1.npz`; the
  retrained ones are `params_ae.npz`.
  """
  data = tmp_path_factory.mktemp("data")
  prepare.prepare("demo", str(data))  # 9 photos, shared by every run
  straight, pod = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("pod")
  logs = {"straight": _run(straight, data, "ae,dm", 2, 2, 1),
          "ae 2x2": _run(pod, data, "ae", 1, 0, 2),
          "resume 2->1": _run(pod, data, "ae,dm", 2, 1, 1)}
  (pod / "params_ae.npz").rename(pod / "params_ae_2to1.npz")  # the next run writes its own
  _corrupt_data(pod / "checkpoints_ae" / "2")
  shutil.rmtree(pod / "latents")  # so that both processes of the next run encode their share
  logs["corrupt, resume 1->2"] = _run(pod, data, "ae,dm", 2, 2, 2)
  return straight, pod, logs


def _assert_equal_but_float_noise(a, b, lr, what):
  """Equal parameter leaves but for float noise that Adam (learning rate `lr`) amplified."""
  assert [x.shape for x in a] == [y.shape for y in b], what
  diff = np.concatenate([np.abs(x - y).ravel() for x, y in zip(a, b)])
  # Adam moves a parameter whose gradient is float noise by up to lr at step 1 and
  # 1.04 lr at step 2 (the largest |m_hat| / sqrt(v_hat) at step 2 for betas (0.5, 0.9)
  # or (0.9, 0.999)) either way, so a few elements may differ by twice that; any other
  # data, crops or state would move most elements.
  assert diff.max() <= 2 * (1 + 1.04) * lr and np.mean(diff > 1e-5) < 0.1, what


def test_pod_run_with_resumes_across_process_counts_equals_straight_run(runs):
  straight, pod, logs = runs
  log_2to1, = logs["resume 2->1"]
  assert "[ae] resumed from step 1" in log_2to1
  assert "step 1 was written by 2 processes, this run has 1" in log_2to1
  for log in logs["corrupt, resume 1->2"]:
    assert "[dm] resumed from step 1" in log, log[-3000:]
    assert "step 1 was written by 1 processes, this run has 2" in log, log[-3000:]
  # dm's latents came from the pod's ae step 2 (step 1 from the 2 -> 1 one, step 2 from the
  # retrained one), each equal to the straight run's but for float noise (both checked here).
  for stage, lr, saved in (("ae", 2e-4, "params_ae_2to1.npz"),  # configs/tiny.py learning rates
                           ("dm", 3e-4, "params_dm.npz")):
    (a, step_a, rng_a) = _params(straight, f"params_{stage}.npz")
    (b, step_b, rng_b) = _params(pod, saved)
    assert step_a == step_b == 2 and np.array_equal(rng_a, rng_b), stage
    _assert_equal_but_float_noise(a, b, lr, stage)


def test_validation_counts_every_record_once_on_two_processes(runs):
  straight, pod, _ = runs
  # The same 9 examples and crops whatever the layout; shares of 5 and 4 records in
  # local batches of 4: a dropped or doubled example would move these means.
  for tag in ("val/l1_loss", "val/psnr", "val/perc_loss", "val/quant_loss"):
    v1, v2 = _val(straight, tag), _val(pod, tag)
    assert 1 in v1 and 1 in v2, (tag, v1, v2)
    np.testing.assert_allclose(v2[1], v1[1], rtol=1e-4)
  assert 2 in _val(pod, "val/z_dm_ema_loss")  # stage-2 validation ran on 2 processes


def test_latent_cache_written_by_both_processes(runs):
  _, pod, _ = runs
  caches = [d for d in (pod / "latents").iterdir() if (d / "meta.json").exists()]
  assert len(caches) == 1
  files = sorted(f.name for f in caches[0].glob("p*.npy"))
  assert files == ["p00000-000000.npy", "p00001-000000.npy"]
  assert [len(np.load(caches[0] / f)) for f in files] == [5, 4]


def test_a_corrupt_newest_checkpoint_on_two_processes_resumes_from_the_previous_one(runs):
  """The pod's stage-1 step 2 (written by 1 process) damaged: both processes of the 2 x 2
  run set it aside (kept, not deleted), resume from step 1 without a hang and retrain step 2."""
  straight, pod, logs = runs
  for log in logs["corrupt, resume 1->2"]:
    assert "is corrupt or incomplete" in log and "[ae] resumed from step 1" in log, log[-3000:]
  assert sorted(p.name for p in (pod / "checkpoints_ae").iterdir()
                if p.name[0].isdigit()) == ["1", "2", "2.unreadable"]
  (a, step_a, _), (b, step_b, _) = (_params(w, "params_ae.npz") for w in (straight, pod))
  assert step_a == step_b == 2
  _assert_equal_but_float_noise(a, b, 2e-4, "retrained ae")
