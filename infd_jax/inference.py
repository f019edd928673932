"""Trained stages on disk -> a `model.Model` on one mesh.

Everything after training builds its model here (`generate`, the condition and
evaluation jobs, the contact sheet, the Python API `infd_jax.load`) and then
works through the `Model`; the parameters and the architecture they were trained
with come from `infd_jax.trained`.
"""

import logging
from typing import Any

import jax
import ml_collections
from etils import epath

from infd_jax import builders, sharding, text_to_image, trained
from infd_jax.model import Model

log = logging.getLogger(__name__)


def load_model(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
               mesh: jax.sharding.Mesh, *, need_dm: bool = True) -> Model:
  """A Model from the stages `config.ckpt` (or the workdir) points at."""
  ae_params = trained.load_ae_params(config, workdir, mesh)
  dm_params = trained.load_dm_params(config, workdir, mesh) if need_dm else None
  return Model(config, mesh, ae_params, dm_params)


def load_t2i_model(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                   mesh: jax.sharding.Mesh) -> Model:
  """A text-to-image Model: stage (a) (the INFD decoder and renderer on SD's latents) from
  `ckpt.ae_checkpoint` or the workdir, SD's parts from `t2i.sd_weights`, and the UNet
  fine-tuned by `t2i_unet` (`ckpt.dm_checkpoint` or the workdir; SD's own if none)."""
  sd = text_to_image.load_sd(config)
  text_to_image.check_latents_match(config, sd)
  ae_params = trained.load_ae_params(config, workdir, mesh)
  unet_params = trained.load_t2i_unet_params(config, workdir, mesh, sd.unet,
                                             sd.unet_inputs(builders.latent_shape(config)[:2]))
  if unet_params is None:
    log.info("no t2i_unet checkpoint in %s: generating with the UNet of %s",
             config.ckpt.dm_checkpoint or workdir, config.t2i.sd_weights)
    unet_params = jax.device_put(sd.params["unet"], sharding.replicated(mesh))
  return Model(config, mesh, ae_params, unet_params, t2i=sd)


def load(path: str | epath.PathLike, mesh: jax.sharding.Mesh | None = None, **overrides: Any
         ) -> Model:
  """`infd_jax.load`: a Model from a workdir or a converted official checkpoint.

  The architecture and settings come from the config saved with the newest
  stage-2 checkpoint (else stage 1; a converted checkpoint's meta); no flags
  (`trained.run_config`).

  Args:
    path: a training workdir or the output of `python -m infd_jax.convert`.
    mesh: devices to use (default: all, pure data parallel).
    **overrides: `section=dict(...)` updates of the config, e.g.
      `sample=dict(tiles_per_call=4)`.
  """
  config = trained.run_config(path, **overrides)
  if trained.Source(path).has("t2i_unet"):
    return load_t2i_model(config, path, mesh or sharding.make_mesh(-1, 1))
  return load_model(config, path, mesh or sharding.make_mesh(-1, 1),
                    need_dm="dm" in trained.Source(path).stages())
