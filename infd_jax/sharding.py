"""Mesh, parameter and batch shardings: one code path from 1 CPU to a TPU pod.

Parameters carry logical axis names (`infd_jax.models.layers`); config rules
map them to the mesh axes `data` and `fsdp`. With `fsdp=1` every parameter is
replicated (pure data parallel); with `fsdp>1` the mapped axes of parameters
and optimizer state shard over `fsdp`. Batches always shard their leading axis
over both axes. A logical axis whose size does not divide by its mesh axis
falls back to replication, so odd shapes (e.g. 3 RGB output channels) never
stop a run.
"""

import itertools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from infd_jax import checks

PyTree = Any
MESH_AXES = checks.MESH_AXES
BATCH_SPEC = P(MESH_AXES)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp) mesh; -1 on one axis takes all remaining devices (UserError
  unless the shape uses every device, `checks.mesh_shape`)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = checks.mesh_shape(data, fsdp, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide evenly (replicates those dims)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def tree_shardings(abstract_tree: PyTree, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> PyTree:
  """NamedShardings for a pytree whose leaves may be `nn.LogicallyPartitioned` boxes.

  Args:
    abstract_tree: e.g. `jax.eval_shape(init_fn, ...)`, boxed or plain leaves.
    mesh: the device mesh.
    rules: (logical axis name, mesh axis or None) pairs.

  Returns:
    A pytree of `NamedSharding` matching the *unboxed* tree.
  """
  logical = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  unboxed = nn.unbox(abstract_tree)
  # An optimizer state masked off a frozen part (`optax.MaskedNode`, a node without leaves)
  # gets a spec from Flax's tuple-typed leaves; it stays an empty node.
  return jax.tree.map(lambda spec, x: x if isinstance(x, optax.MaskedNode) else
                      NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
                      mesh_specs, unboxed, is_leaf=lambda s: isinstance(s, P))


def config_rules(mesh_config) -> tuple[tuple[str, Any], ...]:
  """`config.mesh.rules` (lists after a JSON round trip) as (logical, mesh axis) pairs."""
  return tuple(tuple(rule) for rule in mesh_config.rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's share of a batch into global arrays (the one place it happens)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def fraction_sharded(tree: PyTree) -> float:
  """Fraction of parameter bytes that are not fully replicated (for FSDP checks and logs)."""
  leaves = jax.tree.leaves(tree)
  total = sum(x.size * x.dtype.itemsize for x in leaves)
  sharded = sum(x.size * x.dtype.itemsize for x in leaves if not x.sharding.is_fully_replicated)
  return sharded / max(total, 1)


_BARRIERS = itertools.count()


def barrier(name: str) -> None:
  """Waits for every process (the coordination service's barrier, not a device collective,
  so a process that is minutes late, e.g. still compiling or preparing data, is waited for)."""
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ocp.multihost.sync_global_processes(f"infd {name} {next(_BARRIERS)}")


def compiled_everywhere(jitted, name: str) -> Callable[..., Any]:
  """`jitted`, compiled at its first call and first run once every process has compiled it.

  Processes compile at different speeds (one hits the persistent cache, another not);
  without the barrier CPU collectives give up on a peer that is 30 s late. Later calls
  reuse the executable, so their arguments must keep the first call's shapes.
  """
  if jax.process_count() == 1:
    return jitted
  executable = []

  def call(*args):
    if not executable:
      executable.append(jitted.lower(*args).compile())
      barrier(f"{name} compiled")
    return executable[0](*args)
  return call
