"""Device prefetch: same batches in order, read ahead, and the checkpointed position."""

from etils import epath
import grain
import jax
import numpy as np
import pytest

from infd_jax import sharding
from infd_jax.data import prefetch


def _host_iter():
  ds = grain.MapDataset.range(80).map(lambda i: {"x": np.full((3,), i, np.float32)})
  return iter(ds.batch(8).to_iter_dataset())


def _want(k: int) -> np.ndarray:
  return np.repeat(np.arange(8 * k, 8 * k + 8, dtype=np.float32)[:, None], 3, 1)


def test_prefetch_order_read_ahead_and_checkpoint_position(tmp_path):
  mesh = sharding.make_mesh()
  puts = []

  def put(b):
    puts.append(int(b["x"][0, 0]))
    return sharding.shard_batch(b, mesh)

  it = prefetch.DevicePrefetch(_host_iter(), put, size=2)
  for k in range(3):
    batch = next(it)
    assert isinstance(batch["x"], jax.Array)
    assert batch["x"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
    np.testing.assert_array_equal(np.asarray(batch["x"]), _want(k))
  assert puts == [0, 8, 16, 24, 32]  # batches 3 and 4 are already on the devices
  # grain's own orbax handler saves the position after batch 2, not after the read-ahead.
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), it)
  resumed = prefetch.DevicePrefetch(_host_iter(), lambda b: sharding.shard_batch(b, mesh))
  handler.restore(epath.Path(tmp_path), resumed)
  for k in range(3, 10):
    np.testing.assert_array_equal(np.asarray(next(resumed)["x"]), _want(k))
  with pytest.raises(StopIteration):  # the dataset has 10 batches
    next(resumed)
