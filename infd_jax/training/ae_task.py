"""Stage 1 as a `loop.Task`: models, init, step, data and visualisation."""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from infd_jax import checks, sharding
from infd_jax.data import pipeline, transforms
from infd_jax.training import on_device
from infd_jax.evaluation import metrics as metrics_lib
from infd_jax.evaluation import writers
from infd_jax.models.lpips import load_lpips_params
from infd_jax.rendering import coords
from infd_jax import builders
from infd_jax.model import Model
from infd_jax.training import loop, optim
from infd_jax.training.ae_step import AELoss, ae_train_step
from infd_jax.training.state import AEState

PyTree = Any


def init_fn(config: ml_collections.ConfigDict):
  """key -> boxed AEState (parameters carry logical axis names)."""
  ae, disc = builders.autoencoder(config), builders.discriminator(config)
  tx = optim.ae_optimizer(config.optim, config.train.ae_steps)
  gen_tx = optim.frozen_parts(tx, tuple(config.optim.ae_frozen))
  r, p = config.data.inp_res, config.data.patch

  def init(key: jax.Array) -> AEState:
    k_ae, k_disc, k_rng = jax.random.split(key, 3)
    gen = ae.init(k_ae, jnp.zeros((1, r, r, 3)), jnp.zeros((1, p, p, 2)),
                  jnp.full((1, p, p, 2), 2.0 / p))["params"]
    d = disc.init(k_disc, jnp.zeros((1, p, p, 3)), train=False)
    return AEState(step=jnp.zeros((), jnp.int32), gen_params=gen, disc_params=d["params"],
                   disc_stats=d["batch_stats"], gen_opt=gen_tx.init(gen),
                   disc_opt=tx.init(d["params"]),
                   rng=k_rng)
  return init


def make_step(config: ml_collections.ConfigDict):
  """The stage-1 training step `(state, batch, lpips_params) -> (state, scalars)` on the
  pipeline's compact batches (uint8 images and crops, expanded on the device)."""
  tx = optim.ae_optimizer(config.optim, config.train.ae_steps)
  step = functools.partial(
      ae_train_step, ae=builders.autoencoder(config), disc=builders.discriminator(config),
      lpips=builders.lpips(config), gen_tx=optim.frozen_parts(tx, tuple(config.optim.ae_frozen)),
      disc_tx=tx, loss=AELoss(**config.loss),
      skip_nonfinite=config.train.on_nonfinite == "skip")
  return lambda state, batch, lpips_params: step(state, on_device.ae_batch(batch), lpips_params)


def synthetic_batch(rng: np.random.Generator, batch: int, *, inp_res: int, patch: int
                    ) -> dict[str, np.ndarray]:
  """A random pipeline batch of the real shapes and dtypes (benchmarks, AOT compiles):
  the ground truth is the P x P window in the middle of a 2P x 2P image."""
  images = lambda s: rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)
  crop = np.tile(np.asarray([2 * patch, patch // 2, patch // 2], np.int32), (batch, 1))
  return {"inp": images(inp_res), "gt": images(patch), "crop": crop}


def sd_encoder_start(config: ml_collections.ConfigDict):
  """With `ae.kl_encoder` and `t2i.sd_weights`: fresh state -> that state with SD's imported
  KL encoder (stage (a) of the text-to-image recipe); else None."""
  if not (config.ae.kl_encoder and config.t2i.sd_weights):
    return None
  from infd_jax.convert import sd  # pylint: disable=g-import-not-at-top
  encoder = sd.load(config.t2i.sd_weights)[0]["vae"]["encoder"]

  def warm_start(fresh: Callable[[], AEState], shardings: AEState) -> AEState:
    del shardings  # the fresh state's
    state = fresh()
    target = state.gen_params["encoder"]
    shapes = lambda tree: jax.tree.map(np.shape, tree)
    if shapes(target) != shapes(encoder):
      raise checks.UserError(f"the KL encoder of config.t2i.sd_weights={config.t2i.sd_weights!r}"
                             " does not fit config.ae (take ch, ch_mult, num_res_blocks, "
                             "z_channels and norm_groups from its meta.json 'vae')")
    placed = jax.device_put(encoder, jax.tree.map(lambda x: x.sharding, target))
    return state.replace(gen_params=dict(state.gen_params, encoder=placed))
  return warm_start


def make_task(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> loop.Task:
  """The stage-1 task: global batch `train.ae_batch_size` of multiscale patches."""
  tc = config.train
  step = make_step(config)
  lpips_params = jax.device_put(load_lpips_params(), sharding.replicated(mesh))

  def make_dataset(process_index: int, process_count: int):
    return pipeline.make_ae_dataset(pipeline.stage_config(config.data, "ae"),
                                    global_batch_size=tc.ae_batch_size,
                                    seed=config.seed, process_index=process_index,
                                    process_count=process_count)

  return loop.Task(name="ae", total_steps=tc.ae_steps, global_batch_size=tc.ae_batch_size,
                   init=init_fn(config), step=step, consts=(lpips_params,),
                   make_dataset=make_dataset, metrics=metrics_lib.AETrainMetrics,
                   visualize=make_visualizer(config, mesh),
                   evaluate=make_evaluator(config, mesh, lpips_params),
                   warm_start=sd_encoder_start(config))


def make_evaluator(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   lpips_params: PyTree):
  """Generator losses in eval mode (no LPIPS dropout, BatchNorm running statistics,
  GAN weight 0.75 without the adaptive factor) and PSNR over the validation split,
  or its first `train.eval_batches` batches. None when there is no validation split."""
  if not config.data.eval_split:
    return None
  ae, disc, lp = builders.autoencoder(config), builders.discriminator(config), builders.lpips(config)
  weights = AELoss(**config.loss)
  data = pipeline.stage_config(config.data, "ae") | dict(split=config.data.eval_split)
  local_batch = config.train.ae_batch_size // jax.process_count()

  @jax.jit
  def eval_step(state: AEState, batch, lpips_params):
    mask = batch["_mask"]
    batch = on_device.ae_batch(batch)
    out = ae.apply({"params": state.gen_params}, batch["inp"], batch["coord"], batch["cell"])
    pred, gt = out.pred.astype(jnp.float32), batch["gt"]
    per_example = lambda x: jnp.mean(x, axis=tuple(range(1, x.ndim)))
    # Per-example values (means over equal-sized examples average to the batch
    # values), so padded rows drop out through the mask.
    quant = (1.0 + config.ae.vq_beta) * per_example(
        jnp.square(out.z_q.astype(jnp.float32) - out.z.astype(jnp.float32)))
    l1 = per_example(jnp.abs(pred - gt))
    perc = lp.apply(lpips_params, pred, gt, train=False)
    logits = disc.apply({"params": state.disc_params, "batch_stats": state.disc_stats}, pred,
                        train=False)
    gan_g = -per_example(logits.astype(jnp.float32))
    usage = metrics_lib.codebook_usage(out.indices, max(config.ae.num_codes, 1), mask)
    return metrics_lib.AEEvalMetrics.single_from_model_output(
        loss=weights.quant * quant + weights.l1 * l1 + weights.perc * perc
        + weights.gan_g * gan_g, quant_loss=quant, l1_loss=l1, perc_loss=perc,
        gan_g_loss=gan_g, psnr=metrics_lib.psnr(pred, gt),
        codebook_perplexity=jnp.full(mask.shape, usage["perplexity"]),
        codebook_usage=jnp.full(mask.shape, usage["fraction_used"]), mask=mask)

  eval_step = sharding.compiled_everywhere(eval_step, "ae eval step")

  def evaluate(state: AEState, step: int, writer: writers.MetricWriter) -> None:
    examples, num_records = pipeline.split_examples(
        data, stage="ae", seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count())
    loop.run_evaluation(examples, num_records,
                        lambda batch, i: eval_step(state, batch, lpips_params),
                        local_batch=local_batch, max_batches=config.train.eval_batches,
                        mesh=mesh, writer=writer, step=step)
  return evaluate


def make_visualizer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """Reconstruction grid (pred, gt pairs) and the centre of a 4x zoom rendering, through
  `Model` with the state's generator parameters.

  As the official trainer (REFERENCE.md 4.7): each reconstruction is rendered in one
  call on its crop's own coordinates, the zoom on the central window of a 4x
  rendering. The samples are fixed: the first batch of the pipeline under
  seed+1, so the training iterator is not consumed and resumed runs see the
  same samples.
  """
  r = config.data.patch
  zoom = 4 * r  # official: a 256 window of a 1024 rendering
  model = Model(config, mesh, ae_params=None)
  samples: dict[str, np.ndarray] = {}

  def visualize(state: AEState, step: int, writer: writers.MetricWriter) -> None:
    if not samples:
      n = min(config.train.ae_batch_size, 8)
      ds = pipeline.make_ae_dataset(pipeline.stage_config(config.data, "ae") | {"num_workers": 0},
                                    global_batch_size=n, seed=config.seed + 1)
      samples.update(next(iter(ds)))
    trained = model.with_params(ae_params=state.gen_params)
    z = trained.encode(samples["inp"])
    grids = [coords.window_coord_cell((res, res), (top, left), (r, r))
             for res, top, left in samples["crop"]]
    pred = trained.render_grid(z, *(np.stack(g) for g in zip(*grids)))
    centre = coords.window_coord_cell((zoom, zoom), ((zoom - r) // 2,) * 2, (r, r))
    centre = trained.render_grid(z, *(np.broadcast_to(g, (len(z), *g.shape)) for g in centre))
    gt = transforms.to_float(samples["gt"])
    pairs = np.stack([pred, gt], axis=1).reshape(-1, r, r, 3)
    writer.write_images(step, {
        "ae/recon_pred_gt": writers.make_image_grid(pairs, ncols=4, min_side=128)[None],
        f"ae/center_zoom_{zoom}": writers.make_image_grid(centre, ncols=4, min_side=128)[None]})
  return visualize
