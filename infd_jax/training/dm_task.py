"""Stage 2 as a `loop.Task`: the UNet on the frozen encoder's latents.

With `train.latent_cache` (default) each process encodes its share of the
dataset once, stores it in `workdir/latents/`, and trains from that array; the
encoder then never runs inside the train step. Without it, the step encodes the
images itself.
"""

import functools
import hashlib
import json
import logging
import os
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from infd_jax import sharding
from infd_jax.data import latents as latents_lib
from infd_jax.data import padded, pipeline
from infd_jax.diffusion import gaussian
from infd_jax.evaluation import metrics as metrics_lib
from infd_jax.evaluation import writers
from infd_jax import builders, inference
from infd_jax.model import Model
from infd_jax.training import loop, optim
from infd_jax.training.dm_step import dm_train_step, encode_latents
from infd_jax.training.state import DMState

PyTree = Any
LATENT_FILE_ROWS = 1024  # latents per cache file (FFHQ 256: 48 MiB)


def init_fn(config: ml_collections.ConfigDict):
  """key -> boxed DMState; the EMA starts as a copy of the initial parameters."""
  unet, tx = builders.unet(config), optim.dm_optimizer(config.optim, config.train.dm_steps)
  h, w, c = builders.latent_shape(config)

  def init(key: jax.Array) -> DMState:
    k_init, k_rng = jax.random.split(key)
    params = unet.init(k_init, jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32))["params"]
    return DMState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                   opt=tx.init(params), rng=k_rng)
  return init


def ae_fingerprint(ae_params: PyTree, mesh: jax.sharding.Mesh) -> str:
  """sha256 of the autoencoder's weights (names and bytes); the same on every process."""
  gather = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))
  whole = sharding.compiled_everywhere(gather, "ae fingerprint")(ae_params)
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(whole)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(leaf.addressable_data(0)).tobytes())
  return h.hexdigest()


def _stage_step(source: epath.Path, stage: str) -> int | None:
  folder = source / f"checkpoints_{stage}"
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
  return max(steps, default=None)


def cache_latents(config: ml_collections.ConfigDict, workdir: epath.Path, ae_params: PyTree,
                  mesh: jax.sharding.Mesh) -> epath.Path:
  """Encodes the stage-2 split once into `workdir/latents/<key>/` (or finds it there).

  Each process encodes its own records in batches of its share of
  `train.dm_batch_size` (all processes run the same number of batches; the
  padding is dropped) and streams them to files; nothing holds the dataset.
  The key is the stage-1 step plus a hash of the autoencoder's weights and the
  data and model settings, so latents of another autoencoder are never reused.

  Returns:
    The cache directory (see `infd_jax.data.latents`).
  """
  data = builders.pipeline_config(config.data, "dm")
  settings = json.dumps({"ae": config.ae.to_dict(), "data": {k: data[k] for k in (
      "name", "variant", "split", "inp_res", "resize")}}, sort_keys=True, default=str)
  digest = hashlib.sha256((ae_fingerprint(ae_params, mesh) + settings).encode()).hexdigest()
  step = _stage_step(epath.Path(config.ckpt.ae_checkpoint or workdir), "ae")
  directory = epath.Path(workdir) / "latents" / f"ae{'' if step is None else step}-{digest[:16]}"
  if latents_lib.read_meta(directory) is not None:
    logging.info("latent cache %s", directory)
    return directory
  ae = builders.autoencoder(config)
  encode = sharding.compiled_everywhere(jax.jit(functools.partial(encode_latents, ae)),
                                        "latent encoder")
  examples, num_records = pipeline.split_examples(
      data, stage="dm", seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  local_batch = config.train.dm_batch_size // jax.process_count()
  count = padded.num_batches(num_records, jax.process_count(), local_batch)

  def encoded():
    for i, batch in enumerate(padded.padded_batches(examples, local_batch=local_batch,
                                                    count=count)):
      z = encode(ae_params, sharding.shard_batch({"inp": batch["inp"]}, mesh)["inp"])
      shards = sorted(z.addressable_shards, key=lambda s: s.index[0].start or 0)
      yield np.concatenate([np.asarray(s.data) for s in shards])[batch[padded.MASK]]
      if i % 50 == 0:
        logging.info("latent cache: batch %d/%d", i + 1, count)

  rows = latents_lib.write_share(directory, encoded(), process_index=jax.process_index(),
                                 rows_per_file=LATENT_FILE_ROWS)
  sharding.barrier(f"latents {directory}")
  if jax.process_index() == 0:
    latents_lib.write_meta(directory, num_records=num_records, process_count=jax.process_count(),
                           rows_per_file=LATENT_FILE_ROWS, ae_step=step, settings=settings)
  sharding.barrier(f"latents meta {directory}")
  logging.info("cached %d latents of this process in %s", rows, directory)
  return directory


def make_step(config: ml_collections.ConfigDict):
  """The stage-2 training step `(state, batch, ae_params) -> (state, scalars)`."""
  return functools.partial(
      dm_train_step, unet=builders.unet(config), ae=builders.autoencoder(config),
      tx=optim.dm_optimizer(config.optim, config.train.dm_steps),
      sched=builders.diffusion_schedule(config),
      ema_decay=config.optim.dm_ema, latent_scale=builders.latent_scale(config),
      skip_nonfinite=config.train.on_nonfinite == "skip")


def make_task(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
              mesh: jax.sharding.Mesh) -> loop.Task:
  """The stage-2 task: global batch `train.dm_batch_size` of latents (or images)."""
  tc = config.train
  ae_params = inference.load_ae_params(config, workdir, mesh)
  if not config.diffusion.latent_scale and not tc.latent_cache:
    raise builders.UserError("config.diffusion.latent_scale=0 (1 / std of the training latents) "
                             "needs config.train.latent_cache=True")
  if tc.latent_cache:
    cached = cache_latents(config, workdir, ae_params, mesh)
    if not config.diffusion.latent_scale:  # saved with the stage-2 checkpoints' config
      config.diffusion.latent_scale = 1.0 / latents_lib.latent_std(cached)
      logging.info("diffusion.latent_scale = %.6g (1 / std of the cached latents)",
                   config.diffusion.latent_scale)
  step = make_step(config)
  if tc.latent_cache:
    make_dataset = lambda index, count: latents_lib.latent_dataset(
        cached, global_batch_size=tc.dm_batch_size, seed=config.seed, process_index=index,
        process_count=count, data=builders.pipeline_config(config.data, "dm"))
    consts = (None,)
  else:
    make_dataset = lambda index, count: pipeline.make_dm_dataset(
        builders.pipeline_config(config.data, "dm"), global_batch_size=tc.dm_batch_size,
        seed=config.seed,
        process_index=index, process_count=count)
    consts = (ae_params,)
  return loop.Task(name="dm", total_steps=tc.dm_steps, global_batch_size=tc.dm_batch_size,
                   init=init_fn(config), step=step, consts=consts, make_dataset=make_dataset,
                   metrics=metrics_lib.DMTrainMetrics,
                   visualize=make_visualizer(config, ae_params, mesh),
                   evaluate=make_evaluator(config, ae_params, mesh))


def make_evaluator(config: ml_collections.ConfigDict, ae_params: PyTree,
                   mesh: jax.sharding.Mesh):
  """`z_dm_loss` and `z_dm_ema_loss` on the validation split (the same t, fresh noise in
  each call, as the official evaluation); None when there is no validation split."""
  if not config.data.eval_split:
    return None
  unet, ae = builders.unet(config), builders.autoencoder(config)
  sched = builders.diffusion_schedule(config)
  data = builders.pipeline_config(config.data, "dm") | dict(split=config.data.eval_split)
  local_batch = config.train.dm_batch_size // jax.process_count()
  apply_fn = lambda p, x, t: unet.apply({"params": p}, x, t)

  @jax.jit
  def eval_step(state: DMState, batch, key):
    z0 = encode_latents(ae, ae_params, batch["inp"]) * config.diffusion.latent_scale
    k_t, k_eps, k_eps_ema = jax.random.split(key, 3)
    return metrics_lib.DMEvalMetrics.single_from_model_output(
        z_dm_loss=gaussian.eps_loss(apply_fn, state.params, z0, k_t, k_eps, sched),
        z_dm_ema_loss=gaussian.eps_loss(apply_fn, state.ema_params, z0, k_t, k_eps_ema, sched),
        mask=batch["_mask"])

  eval_step = sharding.compiled_everywhere(eval_step, "dm eval step")

  def evaluate(state: DMState, step: int, writer: writers.MetricWriter) -> None:
    examples, num_records = pipeline.split_examples(
        data, stage="dm", seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count())
    loop.run_evaluation(examples, num_records,
                        lambda batch, i: eval_step(state, batch, jax.random.PRNGKey(i)),
                        local_batch=local_batch, max_batches=config.train.eval_batches,
                        mesh=mesh, writer=writer, step=step)
  return evaluate


def make_visualizer(config: ml_collections.ConfigDict, ae_params: PyTree,
                    mesh: jax.sharding.Mesh):
  """Samples from the EMA weights rendered at the input resolution (fixed seed)."""
  model = Model(config, mesh, ae_params)
  res = config.data.inp_res

  def visualize(state: DMState, step: int, writer: writers.MetricWriter) -> None:
    z = model.sample_global(np.arange(8), config.seed, dm_params=state.ema_params)
    images = model.render(z, (res, res))[:8]
    writer.write_images(step, {"dm/samples_ema": writers.make_image_grid(images, ncols=4,
                                                                          min_side=128)[None]})
  return visualize
