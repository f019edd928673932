"""Checkpoint round trips across meshes, damaged saves, and the stop signal."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from infd_jax import checkpointing, sharding


def _state(mesh):
  w = jnp.arange(8 * 8, dtype=jnp.float32).reshape(8, 8)
  return {"w": jax.device_put(w, NamedSharding(mesh, P(None, "fsdp"))),
          "step": jax.device_put(jnp.int32(7), NamedSharding(mesh, P()))}


def _abstract(mesh, spec):
  return {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, spec)),
          "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}


def _iterator():
  return iter(grain.MapDataset.range(100).seed(3).shuffle().batch(4).to_iter_dataset())


@pytest.mark.parametrize("devices,shape,spec", [
    (1, (1, 1), P()), (8, (2, 4), P(None, "fsdp")), (8, (8, 1), P("data", None))])
def test_saved_on_8_devices_restores_on_other_meshes(tmp_path, devices, shape, spec):
  ckpt = checkpointing.Checkpointer(tmp_path)
  it = _iterator()
  next(it)
  ckpt.save(5, _state(sharding.make_mesh(4, 2)), it, {"note": "x"})
  ckpt.wait_until_finished()
  expected_next = next(it)

  mesh = sharding.make_mesh(*shape, devices=jax.devices()[:devices])
  it2 = _iterator()
  step, state = checkpointing.Checkpointer(tmp_path).restore(_abstract(mesh, spec), it2)
  assert step == 5 and int(state["step"]) == 7
  np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(64).reshape(8, 8))
  assert state["w"].sharding.mesh.devices.size == devices
  np.testing.assert_array_equal(next(it2), expected_next)  # the data iterator continues
  assert ckpt.restore_config()["note"] == "x"


def test_partial_save_is_ignored_and_previous_step_restores(tmp_path):
  mesh = sharding.make_mesh(4, 2)
  ckpt = checkpointing.Checkpointer(tmp_path)
  ckpt.save(1, _state(mesh), None, {})
  ckpt.close()
  # What a SIGKILL during the next save leaves behind: an unfinalised temporary step folder.
  tmp = tmp_path / "2.orbax-checkpoint-tmp-1234"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "garbage").write_bytes(b"\0" * 10)
  again = checkpointing.Checkpointer(tmp_path)
  assert again.latest_step() == 1
  step, state = again.restore(_abstract(mesh, P(None, "fsdp")))
  assert step == 1 and int(state["step"]) == 7


def test_corrupt_checkpoint_raises_instead_of_restarting(tmp_path):
  mesh = sharding.make_mesh(4, 2)
  ckpt = checkpointing.Checkpointer(tmp_path)
  ckpt.save(3, _state(mesh), None, {})
  ckpt.close()
  for root, _, files in os.walk(tmp_path / "3" / "state"):
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"corrupt")
  with pytest.raises(checkpointing.CheckpointError, match="cannot restore step 3"):
    checkpointing.Checkpointer(tmp_path).restore(_abstract(mesh, P()))


def test_sigterm_sets_stop_request():
  stop = checkpointing.StopRequest()
  try:
    assert not stop.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested()
  finally:
    stop.restore_handlers()


def test_relative_directory_is_accepted(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  mesh = sharding.make_mesh(4, 2)
  ckpt = checkpointing.Checkpointer("workdir/checkpoints")
  ckpt.save(1, _state(mesh), _iterator(), {})
  ckpt.close()
  assert (tmp_path / "workdir" / "checkpoints" / "1").is_dir()


def test_iterator_from_another_process_count_moves_to_the_restored_step(tmp_path, caplog):
  mesh = sharding.make_mesh(4, 2)
  ckpt = checkpointing.Checkpointer(tmp_path)
  it = _iterator()
  for _ in range(3):
    next(it)
  ckpt.save(3, _state(mesh), it, {})
  ckpt.close()
  # What two processes leave: their own iterator states, none for a single process.
  folder = tmp_path / "3" / "data_iter"
  state = (folder / "process_0-of-1.json").read_text()
  (folder / "process_0-of-1.json").unlink()
  for p in range(2):
    (folder / f"process_{p}-of-2.json").write_text(state)
  fresh = _iterator()
  with caplog.at_level("WARNING"):
    step, _ = checkpointing.Checkpointer(tmp_path).restore(_abstract(mesh, P()), fresh)
  assert step == 3 and "written by 2 processes" in caplog.text
  expected = list(grain.MapDataset.range(100).seed(3).shuffle().batch(4))[3]
  np.testing.assert_array_equal(next(fresh), expected)
