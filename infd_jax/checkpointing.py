"""One orbax CheckpointManager per run: train state, grain iterator state and config.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames
it when complete), so a process killed mid-save leaves the previous step intact;
the next start resumes from the newest complete step. Restores go into an
abstract state whose leaves carry shardings, so arrays arrive already sharded on
whatever mesh the new run uses (a different device count included).
"""

import json
import logging
import os
import re
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from infd_jax import paths

PyTree = Any


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be read; never silently restart from scratch."""


class Checkpointer:
  """Saves and restores {state, data_iter, config} under `directory`."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = paths.absolute(directory)  # orbax needs absolute paths
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data_iter", "config"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iter": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
        options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def saved_process_count(self, step: int) -> int | None:
    """How many processes wrote `step`'s data-iterator states (None: no iterator saved)."""
    for f in (self.directory / str(step) / "data_iter").glob("process_*-of-*.json"):
      return int(re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name).group(1))
    return None

  def save(self, step: int, state: PyTree, data_iter: Any | None, config: dict) -> None:
    """Starts an async save of `step` (returns before the write finishes)."""
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: PyTree, data_iter: Any | None = None,
              step: int | None = None) -> tuple[int, PyTree]:
    """Restores `state` (and the iterator in place) from `step` or the newest intact step.

    Without `step`, a newest checkpoint that cannot be read is reported in one warning,
    kept on disk as `<step>.unreadable`, and the next older one is tried. The iterator
    is restored when the checkpoint was written by as many processes as run now;
    otherwise it is moved to the restored step of the global data order (see
    `advance_iterator`) with a warning.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set.
      data_iter: a grain iterator whose position is restored in place, or None.
      step: which step; None = newest intact.

    Returns:
      (step, state).
    """
    steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    for i, s in enumerate(steps):
      try:
        return s, self._restore_step(s, abstract_state, data_iter)
      except Exception as e:  # pylint: disable=broad-except  (any unreadable checkpoint)
        reason = re.sub(r"\s+", " ", str(e))[:300]
        if i + 1 == len(steps):
          raise CheckpointError(f"cannot restore step {s} from {self.directory}: {reason}") from e
        kept = self._set_aside(s)
        logging.warning("checkpoint %s is unreadable (%s); kept as %s, resuming from step %d",
                        self.directory / str(s), reason, kept, steps[i + 1])
    raise AssertionError("unreachable")

  def _set_aside(self, step: int) -> epath.Path:
    """Renames an unreadable step to `<step>.unreadable` (orbax ignores it; a new save may
    reuse the step number) and returns the new path."""
    source, target = self.directory / str(step), self.directory / f"{step}.unreadable"
    if jax.process_index() == 0:
      if target.exists():
        target.rmtree()
      source.rename(target)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"infd set aside {source}")
    self._manager.reload()
    return target

  def _restore_step(self, step: int, abstract_state: PyTree, data_iter: Any | None) -> PyTree:
    saved_by = self.saved_process_count(step)
    same_layout = saved_by == jax.process_count()
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None and same_layout:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None and not same_layout:
      advance_iterator(data_iter, step)
      logging.warning("checkpoint step %d was written by %s processes, this run has %d: the data "
                      "iterator continues at step %d of the global data order instead of its "
                      "saved position", step, saved_by, jax.process_count(), step)
    return restored["state"]

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def advance_iterator(data_iter: Any, steps: int) -> None:
  """Moves an iterator of `pipeline.batched` (or a latent dataset) past `steps` batches.

  Local batch k of every process is part of global batch k whatever the process
  count, so skipping `steps` local batches skips `steps` x global batch examples.
  Iterators that keep their state as JSON bytes (as grain's handler expects of
  non-grain iterators, e.g. `prefetch.DevicePrefetch`) are handled too.
  """
  state = data_iter.get_state()
  as_bytes = isinstance(state, bytes)
  state = json.loads(state) if as_bytes else state
  if "next_index" not in state:
    raise CheckpointError(f"cannot move a {type(data_iter).__name__} to step {steps}; resume "
                          "with the process count that wrote the checkpoint")
  state = dict(state, next_index=steps)
  data_iter.set_state(json.dumps(state).encode() if as_bytes else state)


def restore_params(directory: str | os.PathLike, abstract_state: PyTree,
                   step: int | None = None) -> PyTree:
  """Reads one checkpoint's `state` item read-only (e.g. the stage-1 AE for stage 2)."""
  ckpt = Checkpointer(directory, async_save=False)
  try:
    return ckpt.restore(abstract_state, step=step)[1]
  finally:
    ckpt.close()


class StopRequest:
  """Turns SIGTERM (and SIGINT) into a flag the loop checks between steps.

  Jobs are preempted with SIGTERM; the loop then saves, waits for the write and
  exits 0, so a scheduler restart resumes where it stopped.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self._event.set()

  def requested(self) -> bool:
    """True on every process once any process got a stop signal."""
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(multihost_utils.process_allgather(local).any())

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def config_to_json(config) -> dict:
  """The config as plain JSON (tuples become lists)."""
  return json.loads(config.to_json_best_effort())
