"""One orbax CheckpointManager per run stage: train state, grain iterator, config, learned values.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames
it, or writes its commit marker, when complete), so a process killed mid-save
leaves the previous step intact. Restores go into an abstract state whose leaves
carry shardings, so arrays arrive already sharded on whatever mesh the new run
uses (a different device count included).

Restore never loses work. Every process reads the step on its own (no barrier
inside the read, so a failure cannot leave the others waiting), classifies what
happened, and all processes then act on the same decision:
- the saved state tree differs from this run's (a structure or config change):
  one `UserError` naming the differing keys, nothing renamed;
- the step is demonstrably corrupt or incomplete (a checksum or decode error of
  its data, a file of it missing or truncated): it is renamed `<step>.unreadable`
  (never deleted, never overwriting an earlier one) and the next older step is tried;
- a transient read error (storage unavailable, timeouts, I/O errors) is retried a
  few times, then stops with `CheckpointError`, as does anything else.
"""

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import time
from typing import Any, Callable, Iterator

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
# Not exported by orbax; its default jax.Array handler keeps array metadata in this store.
from orbax.checkpoint._src.metadata import array_metadata_store

from infd_jax import checks, paths, sharding

log = logging.getLogger(__name__)
PyTree = Any
# Status codes of tensorstore (orbax's storage layer) for data that is damaged or missing.
_CORRUPT_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE")
_TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED")
_TRANSIENT_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                     errno.EAGAIN, errno.ESTALE}
_OUTCOMES = ("ok", "corrupt", "mismatch", "error")


def _state_writer() -> ocp.PyTreeCheckpointHandler:
  """Orbax's standard handler for the state, without replica-parallel saving on CPU devices.

  Replica-parallel saving splits a replicated array among its replicas with one small
  device program per (shape, device), so that each replica writes a part. CPU devices
  share the host's memory, so on them this splitting only costs compiles (hundreds per
  save of a train state on 8 devices); on CPU one replica writes each array. The files
  are those of `ocp.StandardCheckpointHandler`, which reads them.
  """
  arrays = ocp.type_handlers.ArrayHandler(
      use_replica_parallel=jax.default_backend() != "cpu",
      array_metadata_store=array_metadata_store.Store())  # as orbax's default handler
  registry = ocp.type_handlers.create_type_handler_registry(
      *((t, ocp.type_handlers.get_type_handler(t)) for t in ocp.type_handlers.supported_types()
        if t is not jax.Array), (jax.Array, arrays))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be read; never silently restart from scratch."""


@dataclasses.dataclass
class _Outcome:
  kind: str  # one of _OUTCOMES
  message: str = ""
  value: Any = None


def classify(error: BaseException) -> str:
  """'corrupt', 'transient' or 'error' for an exception raised while reading a step."""
  seen = error
  while seen is not None:
    text = str(seen)
    if isinstance(seen, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError)) or \
        text.startswith(tuple(c + ":" for c in _CORRUPT_CODES)):
      return "corrupt"
    if isinstance(seen, (TimeoutError, ConnectionError)) or \
        (isinstance(seen, OSError) and seen.errno in _TRANSIENT_ERRNOS) or \
        text.startswith(tuple(c + ":" for c in _TRANSIENT_CODES)):
      return "transient"
    seen = seen.__cause__ or seen.__context__
  return "error"


def _one_line(error: BaseException, limit: int = 300) -> str:
  return re.sub(r"\s+", " ", f"{type(error).__name__}: {error}")[:limit]


def _flat(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """{'opt.0.mu.conv.kernel': shape} of a state, abstract state or orbax tree metadata."""
  return {".".join(map(str, k)): tuple(getattr(v, "shape", ()))
          for k, v in ocp.tree.to_flat_dict(tree).items()}


def structure_difference(saved: PyTree, wanted: PyTree, limit: int = 8) -> str:
  """'' if the trees have the same keys and shapes, else the differing keys in one line."""
  a, b = _flat(saved), _flat(wanted)
  parts = [f"{k} only in the checkpoint" for k in sorted(set(a) - set(b))]
  parts += [f"{k} not in the checkpoint" for k in sorted(set(b) - set(a))]
  parts += [f"{k} is {a[k]} in the checkpoint, {b[k]} here" for k in sorted(set(a) & set(b))
            if a[k] != b[k]]
  more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
  return "; ".join(parts[:limit]) + more


def config_difference(saved: dict, current: dict) -> list[str]:
  """Dotted keys whose values differ between two JSON configs, as 'key=now (checkpoint was)'."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += [f"{key}.{d}" for d in config_difference(a, b)]
    elif a != b:
      out.append(f"{key}={b!r} (checkpoint {a!r})")
  return out


def saved_steps(directory: str | os.PathLike) -> list[int]:
  """Complete steps (orbax's commit marker) in a checkpoint folder, newest first; nothing
  is created or cleaned up (a run may be saving there right now)."""
  directory = paths.absolute(directory)
  if not directory.is_dir():
    return []
  return sorted((m.step for m in ocp.step.standard_name_format().find_all(directory)),
                reverse=True)


class Checkpointer:
  """Saves and restores {state, data_iter, config, learned} under `directory`."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False, retries: int = 3, retry_wait: float = 2.0):
    """Opens (read_only=False: creates) the folder of one run stage.

    Args:
      directory: the stage's folder (`trained.stage_dir`).
      keep: newest steps kept; orbax deletes older ones after each save.
      async_save: write in the background.
      read_only: for reading another run's checkpoints: nothing is created,
        deleted (not even the temporary folder of a save in progress) or saved.
      retries, retry_wait: attempts after a transient read error and the base wait (s).
    """
    self.directory = paths.absolute(directory)  # orbax needs absolute paths
    self.read_only, self.retries, self.retry_wait = read_only, retries, retry_wait
    self._manager = None if read_only else ocp.CheckpointManager(
        self.directory, item_names=("state", "data_iter", "config", "learned"),
        item_handlers=self._handlers(_state_writer),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True))

  @staticmethod
  def _handlers(state_handler) -> dict[str, Any]:
    return {"state": state_handler(), "data_iter": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(), "learned": ocp.JsonCheckpointHandler()}

  def all_steps(self) -> list[int]:
    """Steps whose save completed (orbax's commit marker), newest first."""
    return saved_steps(self.directory)

  def latest_step(self) -> int | None:
    return next(iter(self.all_steps()), None)

  def saved_process_count(self, step: int) -> int | None:
    """How many processes wrote `step`'s data-iterator states (None: no iterator saved)."""
    for f in (self._step_dir(step) / "data_iter").glob("process_*-of-*.json"):
      return int(re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name).group(1))
    return None

  def save(self, step: int, state: PyTree, data_iter: Any | None, config: dict,
           learned: dict | None = None) -> None:
    """Starts an async save of `step` (returns before the write finishes).

    `learned` holds what the stage computed that later stages need (e.g. the
    latent scale), saved as its own JSON item beside the config.
    """
    items = dict(state=ocp.args.PyTreeSave(state), config=ocp.args.JsonSave(config))
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    if learned:
      items["learned"] = ocp.args.JsonSave(learned)
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only")
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  # -- reading ----------------------------------------------------------------------------

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / ocp.step.standard_name_format().build_name(step)

  @contextlib.contextmanager
  def _reader(self, state_handler=ocp.StandardCheckpointHandler) -> Iterator[ocp.Checkpointer]:
    """A checkpointer that reads on this process alone (no barrier a failure could strand)."""
    reader = ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(**self._handlers(state_handler)),
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()}))
    try:
      yield reader
    finally:
      reader.close()

  def _saved_tree(self, step: int) -> PyTree:
    """The saved state's tree of array metadata (shapes), read without its data."""
    with self._reader() as reader:
      saved = reader.metadata(self._step_dir(step)).item_metadata["state"]
    return saved.tree if hasattr(saved, "tree") else saved

  def _attempt(self, step: int, read: Callable[[], Any], check: Callable[[], str]) -> _Outcome:
    """Runs check (-> mismatch message or '') then read on this process, retrying transients."""
    for attempt in range(self.retries + 1):
      try:
        mismatch = check()
        if mismatch:
          return _Outcome("mismatch", mismatch)
        return _Outcome("ok", value=read())
      except Exception as e:  # pylint: disable=broad-except  (classified; nothing is swallowed)
        kind = classify(e)
        if kind == "transient" and attempt < self.retries:
          log.warning("reading step %d of %s failed (%s); retrying", step, self.directory,
                      _one_line(e))
          time.sleep(self.retry_wait * (attempt + 1))
          continue
        if kind == "transient":
          return _Outcome("error", f"reading step {step} of {self.directory} failed "
                                   f"{self.retries + 1} times: {_one_line(e)}")
        return _Outcome(kind, _one_line(e))
    raise AssertionError("unreachable")

  def _agree(self, step: int, outcome: _Outcome) -> str:
    """The decision all processes take: the worst outcome of any process."""
    code = _OUTCOMES.index(outcome.kind)
    if jax.process_count() > 1:
      sharding.barrier(f"read step {step} of {self.directory}")
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      code = int(np.max(multihost_utils.process_allgather(np.int32(code))))
    return _OUTCOMES[code]

  def _state_difference(self, step: int, abstract_state: PyTree, config: dict | None) -> str:
    difference = structure_difference(self._saved_tree(step), abstract_state)
    if not difference:
      return ""
    changed = config_difference(self.restore_config(step), config) if config else []
    return (f"checkpoint step {step} in {self.directory} does not fit this run's state ("
            f"{difference})" + (f"; the config differs in {', '.join(changed[:8])}" if changed
                                else "") +
            ": rerun with the checkpoint's settings, or use another --workdir")

  def restore(self, abstract_state: PyTree, data_iter: Any | None = None,
              config: dict | None = None) -> tuple[int, PyTree]:
    """Restores `state` (and the iterator in place) from the newest intact step.

    See the module docstring for what happens to a step that cannot be read (read-only:
    a corrupt step stops with CheckpointError too). The
    iterator is restored when the checkpoint was written by as many processes as run
    now; otherwise it is moved to the restored step of the global data order (see
    `advance_iterator`) with a warning.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set.
      data_iter: a grain iterator whose position is restored in place, or None.
      config: this run's config as JSON (`config_to_json`), to name the settings
        that differ when the saved state does not fit.

    Returns:
      (step, state).
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    set_aside = []
    for step in steps:
      outcome = self._attempt(step, lambda s=step: self._read_state(s, abstract_state, data_iter),
                              lambda s=step: self._state_difference(s, abstract_state, config))
      decision = self._agree(step, outcome)
      if decision == "ok":
        if set_aside:
          log.warning("resumed from step %d of %s; unreadable steps kept as %s", step,
                      self.directory, ", ".join(str(p) for p in set_aside))
        return step, outcome.value
      if decision == "mismatch":
        raise checks.UserError(outcome.message or f"another process found that step {step} of "
                               f"{self.directory} does not fit this run's state (see its log)")
      if decision == "error" or self.read_only:
        raise CheckpointError(f"cannot restore step {step} from {self.directory}: "
                              f"{outcome.message or 'failed on another process (see its log)'}")
      log.warning("checkpoint %s is corrupt or incomplete (%s); setting it aside",
                  self._step_dir(step), outcome.message or "found by another process")
      set_aside.append(self._set_aside(step))
    raise CheckpointError(f"every checkpoint in {self.directory} is corrupt or incomplete; "
                          f"kept as {', '.join(str(p) for p in set_aside)}. Move them away "
                          "to start this stage afresh")

  def _read_state(self, step: int, abstract_state: PyTree, data_iter: Any | None) -> PyTree:
    saved_by = self.saved_process_count(step)
    same_layout = saved_by == jax.process_count()
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None and same_layout:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    with self._reader() as reader:
      restored = reader.restore(self._step_dir(step), args=ocp.args.Composite(**items))
    if data_iter is not None and not same_layout:
      advance_iterator(data_iter, step)
      log.warning("checkpoint step %d was written by %s processes, this run has %d: the data "
                  "iterator continues at step %d of the global data order instead of its "
                  "saved position", step, saved_by, jax.process_count(), step)
    return restored["state"]

  def restore_fields(self, fields: dict[str, PyTree], step: int | None = None) -> dict[str, PyTree]:
    """Only `fields` of a step's state (default newest), read-only: e.g. parameters to sample.

    Nothing is renamed here; a step that cannot be read stops with CheckpointError
    (resuming training in this folder sets a corrupt newest step aside).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")

    def check() -> str:
      saved = self._saved_tree(step)
      difference = structure_difference({k: saved.get(k, {}) for k in fields}, fields)
      return difference and (f"the parameters in {self.directory} (step {step}) do not fit "
                             f"this config's model ({difference})")

    def read() -> dict[str, PyTree]:
      args = ocp.args.PyTreeRestore(item=fields, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(fields))
      with self._reader(ocp.PyTreeCheckpointHandler) as reader:
        restored = reader.restore(self._step_dir(step), args=ocp.args.Composite(state=args))
      return {k: restored["state"][k] for k in fields}

    outcome = self._attempt(step, read, check)
    decision = self._agree(step, outcome)
    if decision == "mismatch":
      raise checks.UserError(outcome.message or f"another process found that step {step} of "
                             f"{self.directory} does not fit this config (see its log)")
    if decision != "ok":
      raise CheckpointError(f"cannot read step {step} of {self.directory} ({decision}): "
                            f"{outcome.message or 'failed on another process (see its log)'}")
    return outcome.value

  def _restore_json(self, item: str, step: int | None) -> dict:
    step = self.latest_step() if step is None else step
    if not (self._step_dir(step) / item).exists():
      return {}
    with self._reader() as reader:
      restored = reader.restore(self._step_dir(step),
                                args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    return restored[item]

  def restore_config(self, step: int | None = None) -> dict:
    """The config saved with a step (default newest), as JSON."""
    return self._restore_json("config", step)

  def restore_learned(self, step: int | None = None) -> dict:
    """What the stage learned and saved with a step (e.g. {'latent_scale': s}); {} if none."""
    return self._restore_json("learned", step)

  def _set_aside(self, step: int) -> epath.Path:
    """Renames a corrupt step to `<step>.unreadable[-k]` (orbax ignores it; a new save may
    reuse the step number); an earlier set-aside copy is kept. Returns the new path."""
    source = self._step_dir(step)
    names = [f"{source.name}.unreadable"] + [f"{source.name}.unreadable-{k}" for k in range(2, 1000)]
    target = next(self.directory / n for n in names if not (self.directory / n).exists())
    sharding.barrier(f"name for {source}")  # every process has chosen before the rename
    if jax.process_index() == 0:
      source.rename(target)
    sharding.barrier(f"set aside {source}")
    self._manager.reload()
    return target

  def reached_preemption(self, step: int) -> bool:
    return self._manager is not None and self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    if self._manager is not None:
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


def config_to_json(config) -> dict:
  """The config as plain JSON (tuples become lists)."""
  return json.loads(config.to_json_best_effort())
