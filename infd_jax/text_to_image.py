"""Stable Diffusion's parts for INFD's text-to-image model (the paper's section 5).

`load_sd` reads the folder `python -m infd_jax.convert.sd` wrote (`t2i.sd_weights`)
and CLIP's BPE vocabulary (`t2i.vocab`) into one `SDParts`: the UNet, KL
autoencoder and text tower modules with their parameters (host arrays), the
tokenizer, SD's noise schedule, objective and latent scale. `guided_latents`
is the one place text-conditioned latents are sampled: classifier-free guidance
on the configured sampler, latents divided by SD's scale, so they are what SD's
encoder gives and what the stage-(a) INFD decoder reads.
"""

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from infd_jax import builders, checks, sharding
from infd_jax.clip.text import TextTransformer
from infd_jax.clip.tokenizer import Tokenizer
from infd_jax.convert import sd as sd_import
from infd_jax.diffusion import prediction, samplers, schedules
from infd_jax.models.sd_unet import SDUNet
from infd_jax.models.sd_vae import KLAutoencoder

PyTree = Any


@dataclasses.dataclass
class SDParts:
  """An imported Stable Diffusion checkpoint, ready to train or sample with.

  Attributes:
    arch: its meta.json (module kwargs, `prediction`, `scaling_factor`, `schedule`).
    params: {'unet', 'vae', 'text'} host parameter trees.
    unet, vae, text: the modules.
    tokenizer: captions -> ids [N, text context length].
    schedule: SD's scaled-linear training schedule.
  """
  arch: dict[str, Any]
  params: dict[str, PyTree]
  unet: SDUNet
  vae: KLAutoencoder
  text: TextTransformer
  tokenizer: Tokenizer
  schedule: schedules.Schedule

  @property
  def objective(self) -> str:
    return self.arch["prediction"]

  @property
  def latent_scale(self) -> float:
    return float(self.arch["scaling_factor"])

  def empty_tokens(self) -> np.ndarray:
    """[1, L] the empty caption's ids (the unconditional context of guidance)."""
    return self.tokenizer([""])

  def unet_inputs(self, latent_hw: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Zero (x, t, context) of batch 1 for shape-only inits of the UNet."""
    t = self.arch["text"]
    return (np.zeros((1, *latent_hw, self.arch["unet"]["in_channels"]), np.float32),
            np.zeros((1,), np.int32), np.zeros((1, t["context_length"], t["width"]), np.float32))


def load_sd(config: ml_collections.ConfigDict) -> SDParts:
  """The SD parts `config.t2i` names; a mismatch with the vocabulary or with stage 1's
  latent channels is one UserError."""
  trees, arch = sd_import.load(config.t2i.sd_weights)
  text = arch["text"]
  # SD 1.x's tokenizer (Hugging Face, OpenAI text tower: QuickGELU) pads with end-of-text,
  # SD 2.x's (OpenCLIP) with 0.
  tokenizer = Tokenizer(config.t2i.vocab, context_length=text["context_length"],
                        pad_with_eot=text["quick_gelu"])
  if tokenizer.vocab_size != text["vocab_size"]:
    raise checks.UserError(
        f"config.t2i.vocab={config.t2i.vocab!r} has {tokenizer.vocab_size} tokens, the text "
        f"tower of {config.t2i.sd_weights} {text['vocab_size']}: use the vocabulary it was "
        "trained with")
  dtype = builders.compute_dtype(config)
  return SDParts(arch=arch, params=trees, unet=SDUNet(**arch["unet"], dtype=dtype),
                 vae=KLAutoencoder(**arch["vae"]), text=TextTransformer(**text),
                 tokenizer=tokenizer, schedule=schedules.scaled_linear_schedule(**arch["schedule"]))


def check_latents_match(config: ml_collections.ConfigDict, sd: SDParts) -> None:
  """Stage 1 must read SD's latent space: its encoder is SD's (`ae.kl_encoder`) with as many
  channels as the UNet models."""
  if not config.ae.kl_encoder:
    raise checks.UserError("the stage-1 autoencoder does not have ae.kl_encoder=True: train "
                           "stage (a) on SD's encoder first (docs/text_to_image.md)")
  if config.ae.z_channels != sd.arch["unet"]["in_channels"]:
    raise checks.UserError(f"stage 1 has ae.z_channels={config.ae.z_channels}, the UNet of "
                           f"{config.t2i.sd_weights} models {sd.arch['unet']['in_channels']}")


def guided_eps(sd: SDParts, context: jax.Array, uncond: jax.Array, scale: float | jax.Array
               ) -> samplers.ApplyFn:
  """(params, x_t, t) -> eps of SD's UNet on `context`, classifier-free guided by `scale`
  against the empty prompt's `uncond` (v models converted to eps)."""
  apply = lambda p, x, t, ctx: sd.unet.apply({"params": p}, x, t, ctx)
  return prediction.guided(prediction.as_eps(apply, sd.schedule, sd.objective), context, uncond,
                           scale)


def guided_latents(config: ml_collections.ConfigDict, sd: SDParts, unet_params: PyTree,
                   context: jax.Array, uncond: jax.Array, scale: float | jax.Array,
                   key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Latents [*shape] (SD's encoder scale: the sampler's output / `scaling_factor`).

  Args:
    config: `sample.sampler`, `sample.spacing`, `diffusion.sample_steps`, `diffusion.eta`.
    sd: the imported parts (UNet module, schedule, objective, latent scale).
    unet_params: the UNet's parameters (SD's or fine-tuned).
    context, uncond: [B, L, C] text contexts of the prompts and of the empty prompt.
    scale: guidance scale (1: the conditional model alone).
    key: sample key (its noise as `samplers.sample` draws it).
    shape: (B, h, w, c) of the latents.
  """
  z = samplers.sample(apply_fn=guided_eps(sd, context, uncond, scale), params=unet_params,
                      key=key, shape=shape,
                      sched=sd.schedule, **builders.sampler_args(config))
  return z / sd.latent_scale


def frozen_params(sd: SDParts, mesh: jax.sharding.Mesh) -> dict[str, PyTree]:
  """The frozen parts of the fine-tuning step on the mesh, replicated: {'vae', 'text',
  'empty_tokens'} (`training.t2i_step`)."""
  return jax.device_put(dict(vae=sd.params["vae"], text=sd.params["text"],
                             empty_tokens=sd.empty_tokens()), sharding.replicated(mesh))
