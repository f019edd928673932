"""Parity with the official PyTorch code on golden fixtures (tests/fixtures/official/).

`make_fixtures.py` there ran the official modules (yinboc/infd) at reduced widths
with seeded weights. Here the official `.pth` goes through our converter's CLI,
our modules are built from the architecture it finds, and every component must
reproduce the official outputs within 1e-4 of the output's scale. The official
training steps of both stages are compared gradient by gradient in
`official_step_test.py`.
"""

import functools
import pathlib

import jax
import numpy as np
import pytest

import infd_jax
from infd_jax.convert import __main__ as convert_cli
from infd_jax.convert import mapping
from infd_jax.models import lpips as lpips_lib
from infd_jax.models.autoencoder import INFDAutoencoder
from infd_jax.models.discriminator import PatchDiscriminator
from infd_jax.models.unet import UNet

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "official"
RTOL = 1e-4  # of the reference's largest magnitude


def assert_matches(ours, official, rtol=RTOL, what=""):
  ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
  assert ours.shape == official.shape, (what, ours.shape, official.shape)
  err = np.max(np.abs(ours - official)) / np.max(np.abs(official))
  assert err <= rtol, f"{what}: max error {err:.2e} of the official scale (allowed {rtol:.0e})"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """The official .pth through `python -m infd_jax.convert`: (directory, meta, trees)."""
  out = tmp_path_factory.mktemp("official") / "converted"
  assert convert_cli.main(["--input", str(FIXTURES / "infd_tiny.pth"), "--output", str(out)]) == 0
  return out, mapping.load_meta(out), mapping.load_converted(out)


@pytest.fixture(scope="module")
def comp():
  return dict(np.load(FIXTURES / "components.npz"))


@pytest.fixture(scope="module")
def autoencoder(converted, comp):
  """Our autoencoder on the official input: (module, params, outputs of each stage)."""
  _, meta, trees = converted
  ae, p = INFDAutoencoder(**meta["ae"]), {"params": trees["ae"]}

  @jax.jit
  def stages(p, inp):
    z = ae.apply(p, inp, method="encode")
    q = ae.apply(p, z, method="quantize")
    return dict(z=z, z_q=q.z_q, indices=q.indices, quant_loss=q.loss,
                phi=ae.apply(p, q.z_q, method="decode"))

  return ae, p, stages(p, comp["inp"])


def test_converter_finds_the_official_architecture(converted):
  _, meta, trees = converted
  assert meta["ae"] | {"vq_beta": 0.25} == dict(
      ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=3, num_codes=16, vq_beta=0.25,
      renderer_hidden=32, renderer_normalize=True, mid_attention=True)
  assert meta["disc"] == dict(ndf=8, n_layers=2)
  assert meta["dm"]["channel_mult"] == (1, 1) and meta["dm"]["attention_resolutions"] == (2,)
  # The EMA of a fresh official model is a copy of z_dm (one shared storage in the .pth).
  jax.tree.map(np.testing.assert_array_equal, trees["dm"], trees["dm_ema"])


def test_encoder_quantizer_decoder(autoencoder, comp):
  _, _, out = autoencoder
  assert_matches(out["z"], comp["z"], what="encoder z")
  np.testing.assert_array_equal(out["indices"], comp["indices"])
  assert len(np.unique(comp["indices"])) >= 4  # several codes in use
  assert_matches(out["z_q"], comp["z_q"], what="quantizer z_q")
  assert_matches(out["quant_loss"], comp["quant_loss"], what="quant loss")
  assert_matches(out["phi"], comp["phi"], what="decoder phi")


@pytest.mark.parametrize("grid", ["grid", "zoom"])
def test_renderer_on_query_grids(autoencoder, comp, grid):
  ae, p, out = autoencoder
  render = jax.jit(functools.partial(ae.apply, method="render"))
  rgb = render(p, out["phi"], comp[f"{grid}_coord"], comp[f"{grid}_cell"])
  assert_matches(rgb, comp[f"{grid}_rgb"], what=f"renderer on {grid}")


def test_tiled_rendering_as_gen_samples(converted, comp):
  """`Model.render` of z at 40 px in 16 px tiles with 4 px context, as the official
  `gen_samples.render_output_patchwise(z, model, 40, 16, 4)` (quantizes z first)."""
  model = infd_jax.load(converted[0], sample=dict(tile=16, pad=4, tiles_per_call=4))
  official = comp["tiled_rgb"]
  assert np.mean(np.abs(official) < 1) > 0.9  # Model.render clips to [-1, 1]: few values are
  assert_matches(model.render(comp["z"], 40), np.clip(official, -1, 1), what="tiled render")


def test_unet_at_several_timesteps(converted, comp):
  _, meta, trees = converted
  apply = jax.jit(UNet(**meta["dm"]).apply)
  for i in range(2):  # one compilation: the same shapes
    eps = apply({"params": trees["dm"]}, comp["unet_x"], comp[f"unet_t{i}"])
    assert_matches(eps, comp[f"unet_eps{i}"], what=f"UNet at t={comp[f'unet_t{i}']}")


def test_discriminator_with_running_statistics(converted, comp):
  _, meta, trees = converted
  apply = jax.jit(functools.partial(PatchDiscriminator(**meta["disc"]).apply, train=False))
  logits = apply(trees["disc"], comp["lpips_x"])
  assert_matches(logits, comp["disc_logits"], what="discriminator logits")


def test_lpips_with_the_package_weights(comp):
  apply = jax.jit(functools.partial(lpips_lib.LPIPS().apply, train=False))
  d = apply(lpips_lib.load_lpips_params(), comp["lpips_x"], comp["lpips_y"])
  assert_matches(d, comp["lpips"], what="LPIPS")
