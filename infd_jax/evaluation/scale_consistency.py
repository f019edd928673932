"""Scale consistency of any-resolution rendering: does render(k*s), downsampled, equal render(s)?

The default filter is the box (area) average over each k x k block. A pixel of an
INFD rendering stands for its cell, so the box average of the k*s rendering is
what the s rendering should show; box averaging is also antialiased for integer
k. Any `jax.image.resize` method (with antialias=True) can be chosen instead,
e.g. "lanczos3", which is sharper but does not match the cell semantics exactly.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infd_jax.evaluation import metrics

RenderFn = Callable[[int], jax.Array]
LpipsFn = Callable[[jax.Array, jax.Array], jax.Array]


def downsample(images: jax.Array, factor: int, method: str = "box") -> jax.Array:
  """[B, k*S, k*S, C] -> [B, S, S, C] by an antialiased filter."""
  b, h, w, c = images.shape
  if h % factor or w % factor:
    raise ValueError(f"{h}x{w} is not divisible by {factor}")
  x = images.astype(jnp.float32)
  if method == "box":
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
  return jax.image.resize(x, (b, h // factor, w // factor, c), method, antialias=True)


def per_image(render_fn: RenderFn, size: int, factors: Sequence[int] = (2, 4),
              lpips_fn: LpipsFn | None = None, method: str = "box") -> dict[str, np.ndarray]:
  """Compares render_fn(size) with downsampled render_fn(k * size) for each k, per image.

  Args:
    render_fn: size -> images [B, size, size, 3] in [-1, 1], the same latents
      every call (model-independent: close over the model and latents).
    size: the base resolution s.
    factors: the scale factors k.
    lpips_fn: optional (x, y) [B, S, S, 3] -> [B] perceptual distance.
    method: "box" or a jax.image.resize method, see the module docstring.

  Returns:
    {'scale_psnr_x<k>': [B] PSNR in dB (inf when identical),
     'scale_lpips_x<k>': [B] LPIPS, only with lpips_fn}.
  """
  base = jnp.asarray(render_fn(size), jnp.float32)
  out = {}
  for k in factors:
    down = downsample(jnp.asarray(render_fn(k * size)), k, method)
    out[f"scale_psnr_x{k}"] = np.asarray(metrics.psnr(down, base))
    if lpips_fn is not None:
      out[f"scale_lpips_x{k}"] = np.asarray(lpips_fn(down, base))
  return out


def scale_consistency(render_fn: RenderFn, size: int, factors: Sequence[int] = (2, 4),
                      lpips_fn: LpipsFn | None = None, method: str = "box") -> dict[str, float]:
  """`per_image`, averaged over the images: {'scale_psnr_x<k>': dB, 'scale_lpips_x<k>': ...}."""
  return {k: float(np.mean(v)) for k, v in per_image(render_fn, size, factors, lpips_fn,
                                                     method).items()}
