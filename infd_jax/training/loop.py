"""The training loop shared by both stages: init or resume, step, log, save, stop.

A `Task` (see `ae_task.py`, `dm_task.py`) supplies the stage-specific pieces;
this loop owns the mesh-wide mechanics: shape-first sharded initialisation,
resume from the newest checkpoint (state, data iterator, RNG), one jitted step
with a donated state, metrics fetched only at log steps, non-finite guards,
periodic visualisation/evaluation, and a clean save-and-exit on SIGTERM.
"""

import dataclasses
import itertools
import logging
import os
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from clu import metrics as clu_metrics

from infd_jax import checkpointing, sharding, trained
from infd_jax.data import padded, prefetch
from infd_jax.evaluation import writers
from infd_jax.training import progress
from infd_jax.training import stop as stop_lib

log = logging.getLogger(__name__)
PyTree = Any


@dataclasses.dataclass
class Task:
  """What one training stage plugs into the loop.

  Attributes:
    name: "ae" or "dm"; checkpoints go to `trained.stage_dir(workdir, name)`.
    total_steps: number of steps to train to.
    global_batch_size: examples per step over all processes.
    init: key -> state with `nn.LogicallyPartitioned` leaves (traced by eval_shape).
    step: (state, batch, *consts) -> (state, scalar metrics); pure, jitted here.
    metrics: the clu Collection the step's scalars go into (merged across steps).
    consts: extra step arguments already on the mesh (frozen weights).
    make_dataset: (process_index, process_count) -> a grain IterDataset of host batches.
    visualize: (state, step, writer) -> None, every `vis_every` steps.
    evaluate: (state, step, writer) -> None, every `eval_every` steps.
    learned: values the stage computed before training that later stages need
      (e.g. the latent scale); saved with every checkpoint.
    warm_start: (fresh, shardings) -> the state a new run starts from (e.g. with imported
      weights), where `fresh()` gives the randomly initialised state (compiled only if
      called: a task that imports every weight skips it) and `shardings` the state's;
      not called when the run resumes.
  """
  name: str
  total_steps: int
  global_batch_size: int
  init: Callable[[jax.Array], PyTree]
  step: Callable[..., tuple[PyTree, dict[str, jax.Array]]]
  make_dataset: Callable[[int, int], Any]
  metrics: type[clu_metrics.Collection]
  consts: tuple = ()
  visualize: Callable[[PyTree, int, writers.MetricWriter], None] | None = None
  evaluate: Callable[[PyTree, int, writers.MetricWriter], None] | None = None
  learned: dict[str, Any] | None = None
  warm_start: Callable[[Callable[[], PyTree], PyTree], PyTree] | None = None


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN/inf; the last good checkpoint is kept."""


def init_key(seed: int) -> jax.Array:
  """The key `Task.init` gets in a new run of `seed`."""
  return jax.random.PRNGKey(seed)


def initial_state(init_fn: Callable[[jax.Array], PyTree], mesh: jax.sharding.Mesh, rules,
                  seed: int):
  """Shape-first initialisation, so no device ever holds an unsharded copy.

  Returns:
    (abstract unboxed state whose leaves carry shardings, the shardings,
     a thunk that initialises the state directly into those shardings).
  """
  key = init_key(seed)
  boxed = jax.eval_shape(init_fn, key)
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  init = jax.jit(lambda k: nn.unbox(init_fn(k)), out_shardings=shardings,
                 compiler_options=_initializer_compiler_options(mesh))
  return abstract, shardings, lambda: init(key)


def _initializer_compiler_options(mesh: jax.sharding.Mesh) -> dict[str, int]:
  """XLA options of the initialiser's program: on CPU, no LLVM optimisation.

  The program runs once, and optimising its many random-number fusions is most of its
  compile: 26.7 s CPU for stage 1 of `configs/tiny.py`, 8.0 s unoptimised. Values may
  differ in the last bit from an optimised program's (multiply-adds that LLVM fuses in the
  uniform initialisers), as they do between backends.
  """
  return {"xla_backend_optimization_level": 0} if mesh.devices.flat[0].platform == "cpu" else {}


def _with_collection(task: Task):
  """The task's step, returning its scalars as a clu Collection (computed inside the jit)."""
  def step(state, batch, *consts):
    state, scalars = task.step(state, batch, *consts)
    return state, task.metrics.single_from_model_output(**scalars)
  return step


def run_evaluation(examples: Iterable[dict[str, np.ndarray]], num_records: int,
                   eval_step: Callable[[dict[str, jax.Array], int], Any], *, local_batch: int,
                   max_batches: int, mesh: jax.sharding.Mesh, writer: writers.MetricWriter,
                   step: int) -> dict[str, float]:
  """Merges `eval_step(global_batch, index)` Collections over a split; writes `val/*`.

  Every process runs the same number of steps (`infd_jax.data.padded`); the
  batches carry a `_mask` that the step passes to its metrics, so each record
  counts once. `max_batches` (0 = all) caps the number of global batches.
  """
  count = padded.num_batches(num_records, jax.process_count(), local_batch)
  count = min(count, max_batches) if max_batches else count
  examples = itertools.islice(examples, count * local_batch)
  merged = None
  for i, batch in enumerate(padded.padded_batches(examples, local_batch=local_batch, count=count)):
    m = eval_step(sharding.shard_batch(batch, mesh), i)
    merged = m if merged is None else merged.merge(m)
  if merged is None:
    return {}
  values = {k: float(v) for k, v in jax.device_get(merged).compute().items()}
  writer.write_scalars(step, {f"val/{k}": v for k, v in values.items()})
  return values


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, task: Task,
          mesh: jax.sharding.Mesh, writer: writers.MetricWriter) -> PyTree:
  """Trains `task` to `task.total_steps`, resuming from `workdir` if possible.

  Returns:
    The final state (sharded global arrays).
  """
  tc = config.train
  rules = sharding.config_rules(config.mesh)
  ckpt = checkpointing.Checkpointer(trained.stage_dir(workdir, task.name),
                                    keep=tc.keep_checkpoints)
  log.info("[%s] compiling the initialiser and opening the data", task.name)
  abstract, shardings, init = initial_state(task.init, mesh, rules, config.seed)
  host_iter = iter(task.make_dataset(jax.process_index(), jax.process_count()))
  data_iter = prefetch.DevicePrefetch(host_iter, lambda b: sharding.shard_batch(b, mesh))

  config_json = checkpointing.config_to_json(config)
  if ckpt.latest_step() is not None:
    start, state = ckpt.restore(abstract, data_iter, config=config_json)
    log.info("[%s] resumed from step %d in %s", task.name, start, ckpt.directory)
  else:
    start = 0
    state = init() if task.warm_start is None else task.warm_start(init, shardings)
    log.info("[%s] initialised a new state", task.name)
  if start >= task.total_steps:
    ckpt.close()
    return state

  step_fn = sharding.compiled_everywhere(jax.jit(
      _with_collection(task), out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=0), f"{task.name} train step")
  report = progress.Progress(task.total_steps, writer, tc.log_every)
  stop = stop_lib.StopRequest()
  merged, last_saved = None, start
  log.info("[%s] compiling the training step, then %d steps (progress every %d steps)",
           task.name, task.total_steps - start, tc.log_every)

  def save(step: int) -> None:
    nonlocal last_saved
    ckpt.save(step, state, data_iter, config_json, task.learned)
    last_saved = step

  def check_and_log(step: int) -> None:
    nonlocal merged
    if merged is None:
      return
    means = {k: float(v) for k, v in jax.device_get(merged).compute().items()}
    if not all(np.isfinite(v) for v in means.values()) and tc.on_nonfinite == "skip":
      # The steps themselves kept the previous state (see `state.skip_unless_finite`).
      log.warning("[%s] non-finite metrics before step %d; those steps were skipped",
                  task.name, step)
    elif not all(np.isfinite(v) for v in means.values()):
      ckpt.wait_until_finished()
      raise NonFiniteLossError(
          f"[{task.name}] non-finite metrics before step {step}: {means}. The last good "
          f"checkpoint is step {last_saved} in {ckpt.directory}; lower the learning rate "
          "or set --config.train.on_nonfinite=skip.")
    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
    merged = None

  try:
    for step in range(start + 1, task.total_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = next(data_iter)
        state, metrics = step_fn(state, batch, *task.consts)
      merged = metrics if merged is None else merged.merge(metrics)  # on device, no sync
      if step == start + 1:
        jax.block_until_ready(state)
        log.info("[%s] step %d done; training", task.name, step)
      report(step)
      if step % tc.log_every == 0 or step == task.total_steps:
        check_and_log(step)
      if tc.vis_every and task.visualize and (step % tc.vis_every == 0 or step == task.total_steps):
        with report.timed("visualize"):
          task.visualize(state, step, writer)
      if tc.eval_every and task.evaluate and step % tc.eval_every == 0:
        with report.timed("eval"):
          task.evaluate(state, step, writer)
      stopping = stop.requested() if (jax.process_count() == 1 or step % tc.log_every == 0) else False
      if step % tc.ckpt_every == 0 or step == task.total_steps or stopping:
        check_and_log(step)
        save(step)
      if stopping or ckpt.reached_preemption(step):
        if last_saved != step:
          save(step)
        log.warning("[%s] stopped at step %d after saving; rerun to resume.", task.name, step)
        ckpt.close()
        raise SystemExit(0)
  finally:
    stop.restore_handlers()
    writer.flush()
  ckpt.close()
  return state
