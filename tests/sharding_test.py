"""Mesh construction and logical-axis -> mesh shardings (8 simulated CPU devices)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from infd_jax import checks, sharding
from infd_jax.models import layers

FSDP_RULES = (("conv_out", "fsdp"), ("mlp_out", "fsdp"))


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = layers.conv(16, 3, in_features=x.shape[-1])(x)
    x = layers.group_norm(1e-6, num_groups=4)(x)
    return layers.conv(3, 3, in_features=16)(x)  # 3 output channels: not divisible by fsdp


def test_make_mesh_fills_minus_one():
  assert dict(sharding.make_mesh(-1, 2).shape) == {"data": 4, "fsdp": 2}
  assert dict(sharding.make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
  assert dict(sharding.make_mesh(1, 1, jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1}


def test_make_mesh_rejects_wrong_device_count():
  with pytest.raises(checks.UserError, match="does not use the 8 devices"):
    sharding.make_mesh(3, 2)


def test_fsdp_rules_shard_divisible_axes_and_replicate_the_rest():
  mesh = sharding.make_mesh(4, 2)
  boxed = jax.eval_shape(_Net().init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)))
  shard = sharding.tree_shardings(boxed, mesh, FSDP_RULES)["params"]
  assert shard["Conv_0"]["kernel"].spec == P(None, None, None, "fsdp")
  assert shard["Conv_0"]["bias"].spec == P("fsdp")
  # 3 output channels do not divide over fsdp=2: replicated instead of failing.
  assert shard["Conv_1"]["kernel"].spec == P(None, None, None, None)
  assert shard["GroupNorm_0"]["scale"].spec == P(None)


def test_data_parallel_rules_replicate_everything():
  mesh = sharding.make_mesh(8, 1)
  boxed = jax.eval_shape(_Net().init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)))
  shard = sharding.tree_shardings(boxed, mesh, ())
  assert all(s.is_fully_replicated for s in jax.tree.leaves(shard))


def test_shard_batch_splits_leading_axis_over_all_devices():
  mesh = sharding.make_mesh(4, 2)
  batch = sharding.shard_batch({"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}, mesh)
  x = batch["x"]
  assert x.shape == (16, 3) and len(x.addressable_shards) == 8
  assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(x), np.arange(48).reshape(16, 3))


def test_fraction_sharded_counts_bytes():
  mesh = sharding.make_mesh(4, 2)
  boxed = jax.eval_shape(_Net().init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)))
  shard = sharding.tree_shardings(boxed, mesh, FSDP_RULES)
  params = jax.jit(lambda k: nn.unbox(_Net().init(k, jnp.zeros((1, 8, 8, 4)))),
                   out_shardings=shard)(jax.random.PRNGKey(0))
  sharded_bytes = 4 * (3 * 3 * 4 * 16 + 16)
  total = 4 * (3 * 3 * 4 * 16 + 16 + 2 * 16 + 3 * 3 * 16 * 3 + 3)
  assert sharding.fraction_sharded(params) == pytest.approx(sharded_bytes / total)
