"""Stage (b) of the text-to-image recipe as a `loop.Task`: SD's UNet fine-tuned on captions.

The UNet starts from the imported SD checkpoint (`t2i.sd_weights`) and trains
with the stage-2 settings (`train.dm_*`, `optim.dm_*`, the stage-2 data) on
batches of images and tokenized captions (`pipeline.make_caption_dataset`);
SD's KL encoder and text tower stay frozen as step arguments
(`training.t2i_step`). Checkpoints go to `checkpoints_t2i_unet` and resume
like the other stages; the stage-(a) INFD autoencoder is not needed here.
"""

import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from infd_jax import checks, text_to_image, trained
from infd_jax.data import pipeline
from infd_jax.evaluation import metrics as metrics_lib
from infd_jax.training import loop, optim
from infd_jax.training.state import DMState
from infd_jax.training.t2i_step import t2i_train_step

NAME = "t2i_unet"
PyTree = Any


def latent_hw(config: ml_collections.ConfigDict, sd: text_to_image.SDParts) -> tuple[int, int]:
  """(h, w) of SD's latents of a `data.inp_res` image (UserError if it does not divide)."""
  factor = 2 ** (len(sd.arch["vae"]["ch_mult"]) - 1)
  if config.data.inp_res % factor:
    raise checks.UserError(f"config.data.inp_res={config.data.inp_res} must be a multiple of "
                           f"{factor}, the downsampling of SD's encoder")
  side = config.data.inp_res // factor
  return side, side


def _check_resume(workdir: str | os.PathLike, sd: text_to_image.SDParts, sd_weights: str) -> None:
  saved = trained.Source(workdir).learned(NAME).get("sd_unet")
  if saved is not None and saved != json.loads(json.dumps(sd.arch["unet"])):
    raise checks.UserError(
        f"the UNet of config.t2i.sd_weights={sd_weights!r} differs from the one the checkpoints "
        f"in {trained.stage_dir(workdir, NAME)} fine-tune ({saved}): use that checkpoint's SD "
        "weights or another --workdir")


def make_task(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
              mesh: jax.sharding.Mesh) -> loop.Task:
  """Global batch `train.dm_batch_size` of (image, caption) pairs for `train.dm_steps` steps."""
  tc = config.train
  sd = text_to_image.load_sd(config)
  _check_resume(workdir, sd, config.t2i.sd_weights)
  data = pipeline.stage_config(config.data, "dm")
  try:
    pipeline.check_captions(data, config.t2i.caption_feature)
  except ValueError as e:
    raise checks.UserError(str(e)) from e
  tx = optim.dm_optimizer(config.optim, tc.dm_steps)
  inputs = sd.unet_inputs(latent_hw(config, sd))

  def new_state(params: PyTree, key: jax.Array) -> DMState:
    """Step 0 at `params` (also the EMA), a fresh optimizer state, init's rng."""
    k_rng = jax.random.split(key)[1]
    return DMState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                   opt=tx.init(params), rng=k_rng)

  def init(key: jax.Array) -> DMState:
    return new_state(sd.unet.init(jax.random.split(key)[0], *inputs)["params"], key)

  def warm_start(fresh: Callable[[], DMState], shardings: DMState) -> DMState:
    """The state `init` gives with the imported UNet as its parameters; the random
    initialisation `fresh` is never compiled (for SD's UNet it takes longer than a step)."""
    del fresh
    start = jax.jit(new_state, out_shardings=shardings)
    return start(jax.device_put(sd.params["unet"], shardings.params),
                 loop.init_key(config.seed))

  step = functools.partial(
      t2i_train_step, unet=sd.unet, vae=sd.vae, text=sd.text, tx=tx, sched=sd.schedule,
      objective=sd.objective, latent_scale=sd.latent_scale, uncond_prob=config.t2i.uncond_prob,
      ema_decay=config.optim.dm_ema, skip_nonfinite=tc.on_nonfinite == "skip")
  make_dataset = lambda index, count: pipeline.make_caption_dataset(
      data, tokenize=sd.tokenizer,
      caption_feature=config.t2i.caption_feature, global_batch_size=tc.dm_batch_size,
      seed=config.seed, process_index=index, process_count=count)
  return loop.Task(name=NAME, total_steps=tc.dm_steps, global_batch_size=tc.dm_batch_size,
                   init=init, step=step, consts=(text_to_image.frozen_params(sd, mesh),),
                   make_dataset=make_dataset, metrics=metrics_lib.T2ITrainMetrics,
                   learned={"sd_unet": sd.arch["unet"]}, warm_start=warm_start)
