"""Conditions on boxes of a virtual image, and the guidance objective over a latent.

A condition names a box (top, left, h, w) of a virtual H x W image, a kind and
a guidance scale; its data (observation, known pixels and mask, text embedding)
is passed separately as arrays, so one compiled objective serves any data of
the same shapes. Losses are per sample, [B]:

  * `low_res`: RMSE between the box rendered and downsampled to the observation's
    size (`downsample`: antialiased bicubic) and the observation, [-1, 1] RGB. The
    box is rendered at a coarser pixel size where that keeps at least twice the
    observation's resolution (`render_reduction`): the renderer takes the pixel
    size, so a virtual image d times smaller is the same field in d x d pixels.
  * `known`: RMSE over the masked pixels between the box render and the pixels.
  * `text`: 1 - cosine similarity between the CLIP embedding of the box render
    (resized to the CLIP input, CLIP-normalised) and the prompt's embedding.

`Objective` maps a latent z0 to these losses: quantize (straight-through),
decode phi once, render each box with `regions.render_window` (so each box is
exactly that window of the full render, or for `low_res` of a coarser one), score
it. Its cost depends on the box sizes (`low_res`: the observation's), not on the
virtual image sizes.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from infd_jax.clip import model as clip_model
from infd_jax.guidance import KINDS, regions
from infd_jax.models.autoencoder import INFDAutoencoder
from infd_jax.rendering import tiles

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Condition:
  """The static part of one condition (its data goes in the `targets` list)."""
  kind: str
  size: tuple[int, int]         # virtual image (H, W) the box lives in
  box: tiles.Window             # (top, left, h, w) in its pixels
  scale: float = 1.0            # guidance scale (step = scale * gradient of the loss)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"condition kind {self.kind!r}: choose one of {', '.join(KINDS)}")
    tiles.check_window(self.size, self.box, "box")


def downsample(images: jax.Array, hw: tuple[int, int]) -> jax.Array:
  """[B, H, W, 3] -> [B, *hw, 3] with an antialiased bicubic filter (the `low_res` operator)."""
  return jax.image.resize(images, (images.shape[0], *hw, images.shape[-1]), "cubic",
                          antialias=True)


def render_reduction(size: tuple[int, int], box: tiles.Window, obs_hw: tuple[int, int]) -> int:
  """The largest d dividing the virtual size and the box with box / d >= 2 x the observation
  (1 when none): a `low_res` box is rendered in a virtual image d times smaller."""
  g = math.gcd(*size, *box)
  fits = [d for d in range(1, g + 1)
          if g % d == 0 and box[2] // d >= 2 * obs_hw[0] and box[3] // d >= 2 * obs_hw[1]]
  return max(fits, default=1)


def _rms(err: jax.Array, weight: jax.Array | None = None) -> jax.Array:
  axes = tuple(range(1, err.ndim))
  if weight is None:
    return jnp.sqrt(jnp.mean(err ** 2, axis=axes) + 1e-12)
  weight = jnp.broadcast_to(weight, err.shape)
  return jnp.sqrt(jnp.sum(weight * err ** 2, axis=axes) / jnp.maximum(jnp.sum(weight, axis=axes), 1)
                  + 1e-12)


def low_res_loss(rgb: jax.Array, target: dict[str, jax.Array]) -> jax.Array:
  """target["image"]: [h', w', 3] (or [B, h', w', 3]) observation in [-1, 1]."""
  obs = target["image"]
  return _rms(downsample(rgb, obs.shape[-3:-1]) - obs)


def known_loss(rgb: jax.Array, target: dict[str, jax.Array]) -> jax.Array:
  """target["image"]: [h, w, 3] pixels in [-1, 1]; target["mask"]: [h, w, 1], 1 = known."""
  return _rms(rgb - target["image"], target["mask"])


def text_loss(rgb: jax.Array, target: dict[str, jax.Array], encode_image: Callable) -> jax.Array:
  """target["embedding"]: [D] CLIP text embedding; encode_image: normalised [B,S,S,3] -> [B,D]."""
  emb = encode_image(rgb)
  emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  txt = target["embedding"] / jnp.linalg.norm(target["embedding"], axis=-1, keepdims=True)
  return 1.0 - jnp.sum(emb * txt, axis=-1)


@dataclasses.dataclass(frozen=True)
class Objective:
  """Latent z0 -> per-condition losses [n, B]; differentiable in z0.

  Attributes:
    ae: the stage-1 autoencoder (quantize, decode, render).
    conditions: what to score.
    clip: a CLIP module, needed by `text` conditions.
    tile, pad: the tiling the boxes are rendered with (as the final render).
    quantize: quantize z0 (straight-through) before decoding, as sampling does.
  """
  ae: INFDAutoencoder
  conditions: tuple[Condition, ...]
  clip: clip_model.CLIP | None = None
  tile: int = 256
  pad: int = 8
  quantize: bool = True

  def __post_init__(self):
    if any(c.kind == "text" for c in self.conditions) and self.clip is None:
      raise ValueError("a text condition needs a CLIP model")

  def losses(self, ae_params: PyTree, clip_params: PyTree, z0: jax.Array,
             targets: list[dict[str, jax.Array]]) -> jax.Array:
    variables = {"params": ae_params}
    phi = self.ae.apply(variables, z0, self.quantize, method="decode_latents")
    render = lambda p, f, coord, cell: self.ae.apply(p, f, coord, cell, method="render")
    out = []
    for cond, target in zip(self.conditions, targets):
      d = (render_reduction(cond.size, cond.box, target["image"].shape[-3:-1])
           if cond.kind == "low_res" else 1)
      rgb = regions.render_window(render, variables, phi, (cond.size[0] // d, cond.size[1] // d),
                                  tuple(v // d for v in cond.box), self.tile, self.pad)
      if cond.kind == "low_res":
        out.append(low_res_loss(rgb, target))
      elif cond.kind == "known":
        out.append(known_loss(rgb, target))
      else:
        size = self.clip.image_size
        encode = jax.checkpoint(lambda x: self.clip.apply(
            {"params": clip_params}, clip_model.preprocess(x, size), method="encode_image"))
        out.append(text_loss(rgb, target, encode))
    return jnp.stack(out)

  def weighted(self, ae_params: PyTree, clip_params: PyTree, z0: jax.Array,
               targets: list[dict[str, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """(sum over conditions and samples of scale * loss, the losses [n, B])."""
    losses = self.losses(ae_params, clip_params, z0, targets)
    scales = jnp.asarray([c.scale for c in self.conditions], jnp.float32)
    return jnp.sum(scales[:, None] * losses), losses
