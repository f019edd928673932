"""Stage 2 as a `loop.Task`: the UNet on the frozen encoder's latents.

With `train.latent_cache` (default) each process encodes its share of the
dataset once, stores it in `workdir/latents/`, and trains from that array; the
encoder then never runs inside the train step. Without it, the step encodes the
images itself.
"""

import functools
import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from infd_jax import sharding
from infd_jax.data import latents as latents_lib
from infd_jax.data import pipeline
from infd_jax.diffusion import gaussian, samplers
from infd_jax.evaluation import metrics as metrics_lib
from infd_jax.evaluation import writers
from infd_jax.rendering import tiling
from infd_jax.training import ae_task, builders, loop, optim
from infd_jax.training.dm_step import dm_train_step, encode_latents
from infd_jax.training.state import DMState

PyTree = Any


def init_fn(config: ml_collections.ConfigDict):
  """key -> boxed DMState; the EMA starts as a copy of the initial parameters."""
  unet, tx = builders.unet(config), optim.dm_optimizer(config.optim)
  h, w, c = builders.latent_shape(config)

  def init(key: jax.Array) -> DMState:
    k_init, k_rng = jax.random.split(key)
    params = unet.init(k_init, jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32))["params"]
    return DMState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                   opt=tx.init(params), rng=k_rng)
  return init


def cache_latents(config: ml_collections.ConfigDict, workdir: pathlib.Path, ae_params: PyTree,
                  mesh: jax.sharding.Mesh) -> np.ndarray:
  """Encodes this process's share of the stage-2 dataset once (or loads the cache)."""
  cache_dir = workdir / "latents"
  path = cache_dir / f"latents_{jax.process_index():05d}-of-{jax.process_count():05d}.npy"
  key = json.dumps({"ae": config.ae.to_dict(), "data": config.data.to_dict(),
                    "ckpt": config.ckpt.ae_checkpoint}, sort_keys=True, default=str)
  meta = path.with_suffix(".json")
  if path.exists() and meta.exists() and meta.read_text() == key:
    return np.load(path)
  ae = builders.autoencoder(config)
  encode = jax.jit(functools.partial(encode_latents, ae))
  # One ordered pass over this process's records (local batch 1, so no tail is dropped),
  # encoded in fixed-size batches that divide over the local devices.
  once = pipeline.make_dm_dataset(
      builders.pipeline_config(config.data, "dm") | dict(shuffle=False, num_epochs=1),
      global_batch_size=jax.process_count(), seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  n_dev = mesh.size // jax.process_count()
  batch_size = max(n_dev, config.train.dm_batch_size // jax.process_count() // n_dev * n_dev)
  images = [example["inp"][0] for example in once]
  chunks = []
  for start in range(0, len(images), batch_size):
    part = np.stack(images[start:start + batch_size])
    padded = np.concatenate([part, np.repeat(part[-1:], batch_size - len(part), 0)])
    z = encode(ae_params, sharding.shard_batch({"inp": padded}, mesh)["inp"])
    shards = sorted(z.addressable_shards, key=lambda s: s.index[0].start or 0)
    chunks.append(np.concatenate([np.asarray(s.data) for s in shards])[:len(part)])
  latents = np.concatenate(chunks)
  cache_dir.mkdir(parents=True, exist_ok=True)
  np.save(path, latents)
  meta.write_text(key)
  logging.info("cached %d latents %s in %s", len(latents), latents.shape[1:], path)
  return latents


def make_task(config: ml_collections.ConfigDict, workdir: pathlib.Path,
              mesh: jax.sharding.Mesh) -> loop.Task:
  """The stage-2 task: global batch `train.dm_batch_size` of latents (or images)."""
  tc = config.train
  ae_params = ae_task.load_params(config, workdir, mesh)
  unet, ae = builders.unet(config), builders.autoencoder(config)
  step = functools.partial(
      dm_train_step, unet=unet, ae=ae, tx=optim.dm_optimizer(config.optim),
      sched=builders.diffusion_schedule(config), ema_decay=config.optim.dm_ema,
      skip_nonfinite=tc.on_nonfinite == "skip")
  local_batch = tc.dm_batch_size // jax.process_count()
  if tc.latent_cache:
    cached = cache_latents(config, workdir, ae_params, mesh)
    make_dataset = lambda index, count: latents_lib.latent_dataset(
        cached, local_batch_size=local_batch, seed=config.seed)
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
  data = builders.pipeline_config(config.data, "dm") | dict(
      split=config.data.eval_split, shuffle=False, num_epochs=1)
  apply_fn = lambda p, x, t: unet.apply({"params": p}, x, t)

  @jax.jit
  def eval_step(state: DMState, batch, key):
    z0 = encode_latents(ae, ae_params, batch["inp"])
    k_t, k_eps, k_eps_ema = jax.random.split(key, 3)
    return metrics_lib.DMEvalMetrics.single_from_model_output(
        z_dm_loss=gaussian.eps_loss(apply_fn, state.params, z0, k_t, k_eps, sched),
        z_dm_ema_loss=gaussian.eps_loss(apply_fn, state.ema_params, z0, k_t, k_eps_ema, sched))

  def evaluate(state: DMState, step: int, writer: writers.MetricWriter) -> None:
    ds = pipeline.make_dm_dataset(data, global_batch_size=config.train.dm_batch_size,
                                  seed=config.seed, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    loop.run_evaluation(ds, lambda batch, i: eval_step(state, batch, jax.random.PRNGKey(i)),
                        max_batches=config.train.eval_batches, mesh=mesh, writer=writer,
                        step=step)
  return evaluate


def make_sampler(config: ml_collections.ConfigDict, num: int, mesh: jax.sharding.Mesh):
  """Jitted (UNet params, ae params, key) -> phi [num, H, W, C]: sample latents, quantize, decode.

  The latents come from `config.sample.sampler` (DDIM by default). phi comes back
  replicated, so every host can render it.
  """
  unet, ae = builders.unet(config), builders.autoencoder(config)
  sched = builders.diffusion_schedule(config)
  shape = (num, *builders.latent_shape(config))
  apply_fn = lambda p, x, t: unet.apply({"params": p}, x, t)
  sampler_args = builders.sampler_args(config)
  # The batch is split over the devices when it divides evenly, else replicated.
  batch_sharding = sharding.batch_sharding(mesh) if num % mesh.size == 0 else None

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def sample(dm_params, ae_params, key):
    z = samplers.sample(apply_fn=apply_fn, params=dm_params, key=key, shape=shape, sched=sched,
                        batch_sharding=batch_sharding, **sampler_args)
    if config.sample.quantize:
      z = ae.apply({"params": ae_params}, z, method="quantize").z_q
    return ae.apply({"params": ae_params}, z, method="decode")
  return sample


def make_visualizer(config: ml_collections.ConfigDict, ae_params: PyTree,
                    mesh: jax.sharding.Mesh):
  """Samples from the EMA weights rendered at the input resolution (fixed seed)."""
  ae = builders.autoencoder(config)
  sample = make_sampler(config, num=8, mesh=mesh)
  renderer = tiling.TiledRenderer(tiling.module_render_fn(ae, "render"), config.sample.tile,
                                  config.sample.pad, config.sample.tiles_per_call)
  res = config.data.inp_res

  def visualize(state: DMState, step: int, writer: writers.MetricWriter) -> None:
    phi = sample(state.ema_params, ae_params, jax.random.PRNGKey(config.seed))
    images = renderer.render_image({"params": ae_params}, phi, (res, res))
    writer.write_images(step, {"dm/samples_ema": writers.make_image_grid(images, ncols=4)[None]})
  return visualize


def load_params(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                mesh: jax.sharding.Mesh) -> PyTree:
  """UNet parameters (EMA if `sample.use_ema`) from `ckpt.dm_checkpoint` or `workdir`."""
  ema = config.sample.use_ema
  return loop.load_stage_params(config, config.ckpt.dm_checkpoint or workdir, stage="dm",
                                init_fn=init_fn(config), mesh=mesh,
                                pick=lambda state: state.ema_params if ema else state.params,
                                converted=("dm_ema" if ema else "dm", "dm"))
