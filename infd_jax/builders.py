"""Builds modules and derived shapes from a config (one place for every job)."""

import jax
import jax.numpy as jnp
import ml_collections

from infd_jax import checks
from infd_jax.diffusion import samplers, schedules
from infd_jax.models.autoencoder import INFDAutoencoder
from infd_jax.models.discriminator import PatchDiscriminator
from infd_jax.models.lpips import LPIPS
from infd_jax.models.unet import UNet

UserError = checks.UserError  # (defined without jax, so config checks import fast)


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """The modules' compute dtype; float64 (parameters and optimizer state too) needs x64."""
  name = config.train.compute_dtype
  if name not in checks.DTYPES:
    raise UserError(f"config.train.compute_dtype={name!r}: use float32 or bfloat16")
  if name == "float64" and not jax.config.jax_enable_x64:
    raise UserError("config.train.compute_dtype='float64' needs JAX's x64 mode "
                    "(JAX_ENABLE_X64=1); use float32 or bfloat16")
  return jnp.dtype(name)


def autoencoder(config: ml_collections.ConfigDict) -> INFDAutoencoder:
  return INFDAutoencoder(**config.ae, dtype=compute_dtype(config))


def discriminator(config: ml_collections.ConfigDict) -> PatchDiscriminator:
  return PatchDiscriminator(**config.disc, dtype=compute_dtype(config))


def lpips(config: ml_collections.ConfigDict) -> LPIPS:
  return LPIPS(dtype=compute_dtype(config))


def unet(config: ml_collections.ConfigDict) -> UNet:
  """The stage-2 UNet; `config.dm.attention_impl` picks XLA or cuDNN attention kernels."""
  impl = config.dm.attention_impl
  if impl not in ("xla", "cudnn"):
    raise UserError(f"config.dm.attention_impl={impl!r}: use 'xla' or 'cudnn'")
  if impl == "cudnn" and compute_dtype(config) == jnp.float32:
    raise UserError("config.dm.attention_impl='cudnn' needs "
                    "--config.train.compute_dtype=bfloat16 (cuDNN attention has no float32 kernel)")
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise UserError(f"config.dm.attention_impl='cudnn' needs an NVIDIA GPU; this run is on "
                    f"{jax.default_backend()}: use 'xla'")
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
  """The scale the UNet trains and samples at (it models latent_scale * z; sampled latents are
  divided by it). Configs saved before the setting existed mean 1.0 (the official). The config
  value 0 (1 / std of the cached latents) must have been resolved by the dm stage before."""
  scale = config.diffusion.get("latent_scale", 1.0)
  if not scale > 0:
    raise UserError(f"config.diffusion.latent_scale={scale}: use a positive scale (0 is resolved "
                    "only by a dm stage on cached latents; to sample, set the scale the stage-2 "
                    "checkpoint was trained with, 1.0 unless it was changed)")
  return float(scale)


def eps_model(config: ml_collections.ConfigDict, unet: UNet) -> samplers.ApplyFn:
  """(params, x_t, t) -> eps of the UNet, as every sampler calls it; with
  `diffusion.x0_rms_max` > 0 (demo-only) its implied x0 is bounded in RMS
  (`samplers.limit_x0_rms`)."""
  apply_fn = lambda p, x, t: unet.apply({"params": p}, x, t)
  max_rms = config.diffusion.get("x0_rms_max", 0.0)
  if max_rms < 0:
    raise UserError(f"config.diffusion.x0_rms_max={max_rms}: use 0 (off) or a positive RMS")
  return samplers.limit_x0_rms(apply_fn, diffusion_schedule(config), max_rms) if max_rms else apply_fn


def sampler_args(config: ml_collections.ConfigDict) -> dict:
  """Keyword arguments of `samplers.sample` from `config.sample` and `config.diffusion`."""
  name, spacing, steps = (config.sample.sampler, config.sample.spacing,
                          config.diffusion.sample_steps)
  if name not in samplers.SAMPLERS:
    raise UserError(f"config.sample.sampler={name!r}: use one of {', '.join(samplers.SAMPLERS)}")
  if spacing not in samplers.SPACINGS:
    raise UserError(f"config.sample.spacing={spacing!r}: use one of "
                    f"{', '.join(samplers.SPACINGS)}")
  if not 1 <= steps <= config.diffusion.num_train_steps:
    raise UserError(f"config.diffusion.sample_steps={steps}: use 1.."
                    f"{config.diffusion.num_train_steps}")
  return dict(name=name, num_steps=steps, eta=config.diffusion.eta, spacing=spacing)


def pipeline_config(data: ml_collections.ConfigDict, stage: str) -> dict:
  """`config.data` -> the keys of `infd_jax.data.pipeline` for one stage ("" / 0 -> None)."""
  from infd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  d = data.to_dict()
  if stage == "dm":
    d.update(variant=d["dm_variant"], split=d["dm_split"], resize=d["dm_resize"])
  keys = pipeline.default_data_config().keys()
  return {k: (None if d[k] in ("", 0) and k in ("variant", "source", "resize") else d[k])
          for k in keys if k in d}


def load_converted_part(config: ml_collections.ConfigDict, source, part: str, family: str):
  """One part ("ae", "dm", "dm_ema") of a converted official checkpoint, host arrays.

  The architecture it was converted from must equal `config.<family>`; a mismatch
  names the differing keys instead of failing later on shapes.
  """
  from infd_jax.convert import mapping  # pylint: disable=g-import-not-at-top
  meta = mapping.load_meta(source)
  if family not in meta:
    raise UserError(f"{source} holds no '{family}' part (converted parts: "
                    f"{sorted(k for k in ('ae', 'disc', 'dm') if k in meta)})")
  wanted = {k: tuple(v) if isinstance(v, list) else v for k, v in config[family].to_dict().items()}
  diff = {k: (wanted[k], v) for k, v in meta[family].items() if k in wanted and wanted[k] != v}
  if diff:
    raise UserError(f"config.{family} differs from the checkpoint in {source}: "
                    + ", ".join(f"{k}={a!r} (checkpoint {b!r})" for k, (a, b) in diff.items()))
  trees = mapping.load_converted(source)
  if part not in trees:
    raise UserError(f"{source} holds no '{part}' parameters (an AE-only checkpoint?)")
  return trees[part]
