"""Training-loop mechanics on a toy task: resume equality, SIGTERM, non-finite guard."""

import os
import pathlib
import signal

import ml_collections
import numpy as np
import pytest

from configs import tiny
from infd_jax import checkpointing, sharding
from infd_jax.evaluation import writers
from infd_jax.training import loop
from tests import toy_task


def _config(**train) -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.train.update(log_every=1, ckpt_every=2, keep_checkpoints=5, **train)
  return c


def _train(workdir: pathlib.Path, steps: int, on_nonfinite: str = "stop", **kwargs):
  mesh = sharding.make_mesh(4, 2)
  writer = writers.create_writer(str(workdir), just_logging=True)
  return loop.train(_config(on_nonfinite=on_nonfinite), workdir,
                    toy_task.make_task(steps, mesh=mesh, **kwargs), mesh, writer)


def test_straight_run_equals_interrupted_and_resumed_run(tmp_path):
  straight = _train(tmp_path / "a", 6)
  _train(tmp_path / "b", 3)                 # stops at step 3 (a final save)
  resumed = _train(tmp_path / "b", 6)       # resumes state *and* data iterator
  assert int(resumed.step) == 6
  np.testing.assert_array_equal(np.asarray(straight.params["w"]), np.asarray(resumed.params["w"]))
  np.testing.assert_array_equal(np.asarray(straight.opt[0].mu["w"]),
                                np.asarray(resumed.opt[0].mu["w"]))


def test_sigterm_saves_and_exits_zero(tmp_path):
  def send_sigterm(i):
    # The loop keeps two batches in flight (prefetch.DevicePrefetch): batch 5 is read
    # while step 3 is handed its batch, so the stop comes after step 3.
    if i == 5:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(SystemExit) as exit_info:
    _train(tmp_path, 100, on_batch=send_sigterm)
  assert exit_info.value.code == 0
  assert checkpointing.Checkpointer(tmp_path / "checkpoints_toy").latest_step() == 3
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(loop.NonFiniteLossError, match="last good checkpoint is step 4"):
    _train(tmp_path, 10, poison_at=5)
  ckpt = checkpointing.Checkpointer(tmp_path / "checkpoints_toy")
  assert ckpt.latest_step() == 4
  mesh = sharding.make_mesh(4, 2)
  abstract, _, _ = loop.initial_state(toy_task._init, mesh, (), 0)  # pylint: disable=protected-access
  _, state = ckpt.restore(abstract)
  assert np.isfinite(np.asarray(state.params["w"])).all()


def test_nonfinite_loss_in_skip_mode_finishes_the_run(tmp_path):
  state = _train(tmp_path, 6, on_nonfinite="skip", poison_at=3)
  assert int(state.step) == 6
  assert checkpointing.Checkpointer(tmp_path / "checkpoints_toy").latest_step() == 6


def test_corrupt_newest_checkpoint_is_kept_and_the_previous_one_resumes(tmp_path, caplog):
  straight = _train(tmp_path / "a", 6)
  _train(tmp_path / "b", 4)                 # checkpoints 2 and 4
  newest = tmp_path / "b" / "checkpoints_toy" / "4"
  for f in (newest / "state").rglob("*"):
    if f.is_file() and not f.name.startswith("_"):
      f.write_bytes(b"corrupt")
  with caplog.at_level("WARNING"):
    resumed = _train(tmp_path / "b", 6)     # resumes from step 2 with its data position
  warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(warnings) == 1 and str(newest) in warnings[0] and "from step 2" in warnings[0]
  assert "\n" not in warnings[0]
  assert (newest.parent / "4.unreadable" / "state").is_dir()  # kept for inspection
  np.testing.assert_array_equal(np.asarray(straight.params["w"]), np.asarray(resumed.params["w"]))
