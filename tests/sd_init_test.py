"""`python -m infd_jax.convert.sd_init`: a random SD-shaped checkpoint that the SD loader and
the modules accept, its latent scale, and one-line errors."""

import json
import jax
import numpy as np
import pytest

from infd_jax.clip.text import TextTransformer
from infd_jax.convert import sd, sd_init
from infd_jax.models.sd_unet import SDUNet
from infd_jax.models.sd_vae import KLAutoencoder

TINY = dict(
    vae=dict(ch=32, ch_mult=[1], num_res_blocks=1, z_channels=4, norm_groups=8),
    unet=dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
              num_heads=-1, num_head_channels=16, context_dim=32, transformer_depth=1,
              in_channels=4, out_channels=4, norm_groups=8),
    text=dict(vocab_size=600, context_length=8, width=32, heads=2, layers=1, quick_gelu=True))


def test_written_checkpoint_loads_and_runs_every_module(tmp_path):
  out = tmp_path / "sd"
  assert sd_init.main([f"--output={out}", f"--arch={json.dumps(TINY)}", "--seed=3"]) == 0
  trees, meta = sd.load(out)
  assert meta["prediction"] == "eps" and meta["scaling_factor"] == 1.0
  assert meta["vae"]["ch_mult"] == (1,) and meta["text"]["context_length"] == 8
  tokens = np.array([[1, 5, 7, 2, 0, 0, 0, 0], [1, 9, 2, 0, 0, 0, 0, 0]], np.int32)
  ctx = TextTransformer(**meta["text"]).apply({"params": trees["text"]}, tokens)
  assert ctx.shape == (2, 8, 32) and not np.allclose(ctx[0], ctx[1])  # distinct captions
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  mean, _ = KLAutoencoder(**meta["vae"]).apply({"params": trees["vae"]}, x, method="encode")
  eps = SDUNet(**meta["unet"]).apply({"params": trees["unet"]}, mean, np.array([10, 500]), ctx)
  assert eps.shape == (2, 16, 16, 4) and np.isfinite(eps).all()


def test_latent_std_is_the_std_of_the_posterior_means():
  arch = sd_init.resolve_arch(json.dumps(TINY))
  trees = sd_init.init_params(arch, 0)
  images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  vae = KLAutoencoder(**arch["vae"])
  means = jax.jit(lambda x: vae.apply({"params": trees["vae"]}, x, method="encode")[0])(
      images / 127.5 - 1.0)
  assert sd_init.latent_std(arch, trees["vae"], images) == pytest.approx(
      np.asarray(means, np.float64).std(), rel=1e-5)


@pytest.mark.parametrize("flags, says", [
    (["--arch=huge"], "neither a preset"),
    (['--arch={"unet": {}}'], "lacks the module kwargs of ['vae', 'text']"),
    (["--calibrate_res=-1"], "--calibrate_res=-1"),
])
def test_bad_flags_stop_with_exit_2_before_writing(tmp_path, capsys, flags, says):
  with pytest.raises(SystemExit) as stop:
    sd_init.main([f"--output={tmp_path / 'o'}", *flags])
  assert stop.value.code == 2 and says in capsys.readouterr().err.splitlines()[-1]
  assert not (tmp_path / "o").exists()
