"""Checkpoint round trips across meshes, damaged saves, restores that never lose work, and
the stop signal."""

import errno
import json
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from infd_jax import checkpointing, checks, sharding
from infd_jax.training import stop as stop_lib


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


def test_a_replicated_state_on_8_cpu_devices_saves_without_compiling(tmp_path, caplog):
  """Replica-parallel saving would slice each replicated array on every device, one compile
  per (shape, device): 8 x 12 here. On CPU one replica writes each array."""
  mesh = sharding.make_mesh(4, 2)
  state = {f"b{n}": jax.device_put(jnp.arange(8.0 * n), NamedSharding(mesh, P()))
           for n in range(1, 13)}
  ckpt = checkpointing.Checkpointer(tmp_path)
  with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
    ckpt.save(1, state, None, {})
    ckpt.wait_until_finished()
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
              for k, v in state.items()}
  _, restored = checkpointing.Checkpointer(tmp_path).restore(abstract)
  for n in range(1, 13):
    np.testing.assert_array_equal(np.asarray(restored[f"b{n}"]), np.arange(8.0 * n))


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


def _corrupt_data(step_dir):
  """Flips one byte in the middle of every data file of a saved state (a failed checksum)."""
  files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and not f.name.startswith("_")]
  for f in files:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
  return files


def _listing(folder):
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_corrupt_newest_step_is_set_aside_and_the_previous_one_restores(tmp_path):
  mesh = sharding.make_mesh(4, 2)
  ckpt = checkpointing.Checkpointer(tmp_path)
  for step in (2, 4):
    ckpt.save(step, _state(mesh), None, {})
  ckpt.close()
  (tmp_path / "4.unreadable").mkdir()  # set aside by an earlier run: must survive
  (tmp_path / "4.unreadable" / "note").write_text("earlier")
  _corrupt_data(tmp_path / "4")
  damaged = _listing(tmp_path / "4")
  step, state = checkpointing.Checkpointer(tmp_path).restore(_abstract(mesh, P()))
  assert step == 2 and int(state["step"]) == 7
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4.unreadable", "4.unreadable-2"]
  assert (tmp_path / "4.unreadable" / "note").read_text() == "earlier"
  assert _listing(tmp_path / "4.unreadable-2") == damaged  # moved, not rewritten


def test_when_every_step_is_corrupt_the_run_stops_and_keeps_them(tmp_path):
  mesh = sharding.make_mesh(4, 2)
  ckpt = checkpointing.Checkpointer(tmp_path)
  ckpt.save(3, _state(mesh), None, {})
  ckpt.close()
  _corrupt_data(tmp_path / "3")
  with pytest.raises(checkpointing.CheckpointError, match="every checkpoint .* is corrupt"):
    checkpointing.Checkpointer(tmp_path).restore(_abstract(mesh, P()))
  assert [p.name for p in tmp_path.iterdir()] == ["3.unreadable"]


def test_read_only_restores_rename_nothing(tmp_path):
  mesh = sharding.make_mesh(4, 2)
  ckpt = checkpointing.Checkpointer(tmp_path)
  for step in (2, 4):
    ckpt.save(step, _state(mesh), None, {})
  ckpt.close()
  _corrupt_data(tmp_path / "4")
  reader = checkpointing.Checkpointer(tmp_path, read_only=True)
  with pytest.raises(checkpointing.CheckpointError, match="step 4"):
    reader.restore(_abstract(mesh, P()))
  with pytest.raises(checkpointing.CheckpointError, match="cannot read step 4 .*DATA_LOSS"):
    reader.restore_fields({"w": _abstract(mesh, P())["w"]})
  np.testing.assert_array_equal(  # an older step reads fine
      reader.restore_fields({"w": _abstract(mesh, P())["w"]}, step=2)["w"],
      np.arange(64).reshape(8, 8))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4"]


def test_a_state_of_another_structure_stops_naming_keys_and_settings(tmp_path):
  mesh = sharding.make_mesh(4, 2)
  ckpt = checkpointing.Checkpointer(tmp_path)
  for step in (2, 4):
    ckpt.save(step, _state(mesh), None, {"optim": {"cosine_decay": False, "lr": 1.0}})
  ckpt.close()
  before = _listing(tmp_path)
  wanted = dict(_abstract(mesh, P()), count=jax.ShapeDtypeStruct((), jnp.int32))
  wanted["w"] = jax.ShapeDtypeStruct((8, 4), jnp.float32)
  with pytest.raises(checks.UserError) as e:
    checkpointing.Checkpointer(tmp_path).restore(
        wanted, config={"optim": {"cosine_decay": True, "lr": 1.0}})
  message = str(e.value)
  assert "\n" not in message and "step 4" in message
  for part in ("count not in the checkpoint", "w is (8, 8) in the checkpoint, (8, 4) here",
               "optim.cosine_decay=True (checkpoint False)"):
    assert part in message, message
  assert "lr" not in message
  assert _listing(tmp_path) == before  # nothing renamed, nothing written


@pytest.mark.parametrize("failures,restored", [(2, True), (3, False)])
def test_transient_read_errors_are_retried_then_stop(tmp_path, monkeypatch, failures, restored):
  mesh = sharding.make_mesh(4, 2)
  ckpt = checkpointing.Checkpointer(tmp_path)
  ckpt.save(2, _state(mesh), None, {})
  ckpt.close()
  reader = checkpointing.Checkpointer(tmp_path, retries=2, retry_wait=0.0)
  read, calls = reader._read_state, []  # pylint: disable=protected-access

  def flaky(*args):
    calls.append(1)
    if len(calls) <= failures:
      raise ValueError("UNAVAILABLE: connection reset while reading the state")
    return read(*args)
  monkeypatch.setattr(reader, "_read_state", flaky)
  if restored:
    assert reader.restore(_abstract(mesh, P()))[0] == 2
  else:
    with pytest.raises(checkpointing.CheckpointError, match="failed 3 times: .*UNAVAILABLE"):
      reader.restore(_abstract(mesh, P()))
  assert len(calls) == min(failures + 1, 3)
  assert [p.name for p in tmp_path.iterdir()] == ["2"]


def _chained(outer, inner):
  try:
    try:
      raise inner
    except BaseException as e:
      raise outer from e
  except BaseException as e:  # pylint: disable=broad-except
    return e


@pytest.mark.parametrize("error,kind", [
    (ValueError("DATA_LOSS: Error decoding manifest: CRC-32C checksum verification failed"),
     "corrupt"),
    (ValueError("OUT_OF_RANGE: Requested byte range [0, 402) is not valid for value of size 201"),
     "corrupt"),
    (_chained(Exception("Encountered error while reading array index"),
              ValueError("NOT_FOUND: Error reading local file")), "corrupt"),
    (json.JSONDecodeError("Expecting value", "", 0), "corrupt"),
    (ValueError("UNAVAILABLE: GCS backend"), "transient"),
    (OSError(errno.EIO, "Input/output error"), "transient"),
    (TimeoutError(), "transient"),
    (ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB"), "error"),
    (MemoryError(), "error"),
    (ValueError("User-provided restore item and on-disk value metadata tree structures do "
                "not match"), "error"),
])
def test_classify(error, kind):
  assert checkpointing.classify(error) == kind


def test_learned_values_are_saved_with_a_step(tmp_path):
  mesh = sharding.make_mesh(4, 2)
  ckpt = checkpointing.Checkpointer(tmp_path)
  ckpt.save(1, _state(mesh), None, {})
  ckpt.save(2, _state(mesh), None, {}, learned={"latent_scale": 0.25})
  ckpt.close()
  reader = checkpointing.Checkpointer(tmp_path, read_only=True)
  assert reader.restore_learned() == {"latent_scale": 0.25}
  assert reader.restore_learned(1) == {}  # an older checkpoint has none


def test_sigterm_sets_stop_request():
  stop = stop_lib.StopRequest()
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
