"""A tiny linear-regression `loop.Task` that exercises the loop's mechanics quickly."""

import functools

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics

from infd_jax.training import loop
from infd_jax.training.state import DMState

DIM = 8


def records(n: int = 64) -> np.ndarray:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, DIM)).astype(np.float32)
  return np.concatenate([x, x @ rng.normal(size=(DIM, 1)).astype(np.float32)], axis=1)


def _init(key):
  w = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("mlp_in", "mlp_out"))
  params = {"w": w(key, (DIM, 1))}
  tx = optax.adam(0.05)
  return DMState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                 opt=tx.init(params), rng=key)


def _step(state, batch, scale, *, poison_at=None):
  x, y = batch["xy"][:, :DIM], batch["xy"][:, DIM:]

  def loss_fn(p):
    return jnp.mean((x @ p["w"] * scale - y) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  if poison_at is not None:
    loss = jnp.where(state.step + 1 == poison_at, jnp.nan, loss)
  updates, opt = optax.adam(0.05).update(grads, state.opt, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt=opt), {"loss": loss}


def make_task(total_steps: int, *, global_batch_size: int = 8, mesh=None, poison_at=None,
              on_batch=None, shuffle: bool = True) -> loop.Task:
  """`on_batch(i)` runs before yielding the i-th batch (1-based), e.g. to send a signal."""
  data = records()

  def make_dataset(index, count):
    ds = grain.MapDataset.source(data)[index::count].seed(1)
    ds = (ds.shuffle() if shuffle else ds).repeat().map(lambda r: {"xy": r})
    ds = ds.batch(global_batch_size // count, drop_remainder=True)
    if on_batch is None:
      return ds.to_iter_dataset()
    # No read-ahead, so the hook runs exactly when the loop asks for batch i.
    ds = ds.map_with_index(lambda i, b: (on_batch(i + 1), b)[1])
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))

  scale = jnp.float32(1.0)
  if mesh is not None:
    scale = jax.device_put(scale, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return loop.Task(name="toy", total_steps=total_steps, global_batch_size=global_batch_size,
                   init=_init, step=functools.partial(_step, poison_at=poison_at),
                   make_dataset=make_dataset, consts=(scale,),
                   metrics=clu_metrics.Collection.create(
                       loss=clu_metrics.Average.from_output("loss")))
