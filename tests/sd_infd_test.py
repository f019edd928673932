"""Stage (a) of the text-to-image recipe: an INFD decoder and renderer on SD's frozen encoder.

The autoencoder takes Stable Diffusion's KL encoder (`ae.kl_encoder`, imported
from the tiny SD 1.x fixture) and trains the rest with the stage-1 losses while
`optim.ae_frozen=("encoder",)` leaves the encoder untouched.
"""

import functools
import pathlib

import flax.linen as nn
import jax
import numpy as np
import PIL.Image
import skimage.data

from infd_jax import builders
from infd_jax.configs import tiny
from infd_jax.convert import sd
from infd_jax.models.lpips import load_lpips_params
from infd_jax.training import ae_task

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "sd"


@functools.cache
def sd_config():
  c = tiny.get_config()
  _, arch = sd.read(FIXTURE / "sd1")
  c.ae.update(ch=arch["vae"]["ch"], ch_mult=arch["vae"]["ch_mult"],
              num_res_blocks=arch["vae"]["num_res_blocks"], z_channels=arch["vae"]["z_channels"],
              norm_groups=arch["vae"]["norm_groups"], num_codes=0, renderer_hidden=16,
              kl_encoder=True)
  c.optim.ae_frozen = ("encoder",)
  return c


def initial_state(config):
  trees, _ = sd.read(FIXTURE / "sd1")
  state = jax.jit(lambda k: nn.unbox(ae_task.init_fn(config)(k)))(jax.random.PRNGKey(0))
  gen = dict(state.gen_params, encoder=trees["vae"]["encoder"])
  return state.replace(gen_params=gen)


def photo_batch(res: int, patch: int) -> dict[str, np.ndarray]:
  """Pipeline batch of real photos: the input at res, the ground truth the middle P x P
  window of the photo at 2P (crop = (side, top, left), as `ae_task.synthetic_batch`)."""
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
            skimage.data.rocket()]
  size = lambda im, s: np.asarray(PIL.Image.fromarray(im).resize((s, s), PIL.Image.BICUBIC))
  big = [size(im, 2 * patch) for im in photos]
  q = patch // 2
  return {"inp": np.stack([size(im, res) for im in photos]),
          "gt": np.stack([b[q:q + patch, q:q + patch] for b in big]),
          "crop": np.tile(np.asarray([2 * patch, q, q], np.int32), (len(photos), 1))}


def test_kl_encoder_with_imported_weights_gives_diffusers_posterior_mean():
  state = initial_state(sd_config())
  with np.load(FIXTURE / "outputs.npz") as f:
    images, mean = f["images_nhwc"], f["vae_mean"]
  encode = functools.partial(builders.autoencoder(sd_config()).apply, method="encode")
  z = jax.jit(encode)({"params": state.gen_params}, images)
  err = np.max(np.abs(np.asarray(z) - mean)) / np.max(np.abs(mean))
  assert err < 1e-4


def test_stage1_losses_train_decoder_and_renderer_with_the_encoder_bit_identical():
  config = sd_config()
  state = initial_state(config)
  encoder = jax.tree.map(np.array, state.gen_params["encoder"])
  others = jax.tree.map(np.array, {k: v for k, v in state.gen_params.items() if k != "encoder"})
  batch = photo_batch(config.data.inp_res, config.data.patch)
  step = jax.jit(ae_task.make_step(config))
  lpips_params = load_lpips_params()
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch, lpips_params)
    losses.append(float(metrics["l1_loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  for a, b in zip(jax.tree.leaves(state.gen_params["encoder"]), jax.tree.leaves(encoder)):
    np.testing.assert_array_equal(np.asarray(a), b)
  changed = [not np.array_equal(np.asarray(a), b) for a, b in zip(
      jax.tree.leaves({k: v for k, v in state.gen_params.items() if k != "encoder"}),
      jax.tree.leaves(others))]
  assert all(changed)
