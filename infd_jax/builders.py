"""Builds modules and derived shapes from a config (one place for every job)."""

import jax.numpy as jnp
import ml_collections

from infd_jax.diffusion import samplers, schedules
from infd_jax.models.autoencoder import INFDAutoencoder
from infd_jax.models.discriminator import PatchDiscriminator
from infd_jax.models.lpips import LPIPS
from infd_jax.models.unet import UNet


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """The modules' compute dtype; float64 (parameters and optimizer state too) needs x64."""
  return jnp.dtype(config.train.compute_dtype)


def autoencoder(config: ml_collections.ConfigDict) -> INFDAutoencoder:
  return INFDAutoencoder(**config.ae, dtype=compute_dtype(config))


def discriminator(config: ml_collections.ConfigDict) -> PatchDiscriminator:
  return PatchDiscriminator(**config.disc, dtype=compute_dtype(config))


def lpips(config: ml_collections.ConfigDict) -> LPIPS:
  return LPIPS(dtype=compute_dtype(config))


def unet(config: ml_collections.ConfigDict) -> UNet:
  """The stage-2 UNet; `config.dm.attention_impl` picks XLA or cuDNN attention kernels."""
  return UNet(**config.dm, in_channels=config.ae.z_channels, out_channels=config.ae.z_channels,
              dtype=compute_dtype(config))


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(h, w, c) of z for an `inp_res` input: the encoder downsamples len(ch_mult)-1 times."""
  factor = 2 ** (len(config.ae.ch_mult) - 1)
  side = config.data.inp_res // factor
  return side, side, config.ae.z_channels


def diffusion_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  d = config.diffusion
  return schedules.linear_schedule(d.beta_start, d.beta_end, d.num_train_steps)


def latent_scale(config: ml_collections.ConfigDict) -> float:
  """The scale the UNet samples at (it models latent_scale * z; sampled latents are divided
  by it): positive once `trained.adopt_architecture` read it from the stage-2 checkpoint
  (`config_checks` refuses 0 for sampling)."""
  return float(config.diffusion.latent_scale)


def eps_model(config: ml_collections.ConfigDict, unet: UNet) -> samplers.ApplyFn:
  """(params, x_t, t) -> eps of the UNet, as every sampler calls it; with
  `diffusion.x0_rms_max` > 0 (demo-only) its implied x0 is bounded in RMS
  (`samplers.limit_x0_rms`)."""
  apply_fn = lambda p, x, t: unet.apply({"params": p}, x, t)
  max_rms = config.diffusion.x0_rms_max
  return samplers.limit_x0_rms(apply_fn, diffusion_schedule(config), max_rms) if max_rms else apply_fn


def sampler_args(config: ml_collections.ConfigDict) -> dict:
  """Keyword arguments of `samplers.sample` from `config.sample` and `config.diffusion`."""
  return dict(name=config.sample.sampler, num_steps=config.diffusion.sample_steps,
              eta=config.diffusion.eta, spacing=config.sample.spacing)
