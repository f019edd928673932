"""Config files: they live in the top-level configs/ folder, load, carry the official numbers,
parse their arg string, and pass the config checks."""

import pathlib

import pytest

from configs import custom, demo, ffhq, ffhq_mix6k, openmoji, openmoji_t2i, tiny
from infd_jax import config_checks, config_files, defaults

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module,arg", [(ffhq, None), (ffhq_mix6k, None), (custom, None),
                                        (custom, "size=small,stage=all"), (demo, None),
                                        (tiny, None), (openmoji, None),
                                        (openmoji, "size=full,stage=ae"), (openmoji_t2i, None)])
def test_every_config_loads_with_known_data_keys_and_passes_the_checks(module, arg):
  from infd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = module.get_config(arg)
  config_checks.check_config(c)
  for stage in ("ae", "dm"):
    assert set(pipeline.stage_config(c.data, stage)) <= set(pipeline.default_data_config())


def test_configs_resolve_by_name_or_repository_path(tmp_path):
  shipped = str(ROOT / "configs" / "custom.py")  # from the repository, not a second copy
  assert config_files.config_dir() == ROOT / "configs"
  assert not (ROOT / "infd_jax" / "configs").exists()
  assert config_files.resolve("custom:size=small") == shipped + ":size=small"
  assert config_files.resolve("configs/custom.py") == "configs/custom.py"  # exists from the root
  own = tmp_path / "custom.py"
  own.write_text("")
  assert config_files.resolve(f"{own}:x=1") == f"{own}:x=1"  # an existing file wins
  assert config_files.resolve("nope.py") == "nope.py"  # left for the loader to report
  assert config_files.load("tiny:stage=dm").stage == "dm"
  assert "common" not in config_files.names() and "tiny" in config_files.names()
  with pytest.raises(ValueError, match="size='huge'"):
    custom.get_config("size=huge")


def test_ffhq_carries_the_official_numbers():
  c = ffhq.get_config()  # REFERENCE.md 2.3-2.5, 4.5, 6.4
  assert (c.train.ae_batch_size, c.train.ae_steps) == (8, 1_000_000)
  assert (c.train.dm_batch_size, c.train.dm_steps) == (48, 600_000)
  assert (c.optim.ae_lr, c.optim.ae_b1, c.optim.ae_b2) == (3.6e-5, 0.5, 0.9)
  assert (c.optim.dm_lr, c.optim.dm_weight_decay, c.optim.dm_ema) == (9.6e-5, 0.01, 0.9999)
  assert (c.diffusion.beta_start, c.diffusion.beta_end, c.diffusion.sample_steps) == (
      0.0015, 0.0195, 200)
  assert (c.data.gt_res_min, c.data.gt_res_max, c.data.patch) == (256, 1024, 256)
  assert (c.sample.tile, c.sample.pad) == (256, 8) and c.loss.gan_g == 0.75


def test_parse_arg_types_values_and_rejects_unknown_keys():
  parsed = defaults.parse_arg("stage=dm,steps=5,fast=true", stage="ae", steps=1, fast=False)
  assert (parsed.stage, parsed.steps, parsed.fast) == ("dm", 5, True)
  assert ffhq.get_config("stage=sample").stage == "sample"
  with pytest.raises(KeyError, match="stagee"):
    defaults.parse_arg("stagee=dm", stage="ae")


def test_the_x0_bound_is_off_except_in_the_demo():
  assert [m.get_config().diffusion.x0_rms_max for m in (ffhq, custom, tiny)] == [0.0] * 3
  assert custom.get_config("size=small").diffusion.x0_rms_max == 0.0
  assert demo.get_config().diffusion.x0_rms_max > 0


def test_a_text_to_image_model_needs_no_learned_stage_2_scale():
  from infd_jax import checks  # pylint: disable=g-import-not-at-top
  c = openmoji_t2i.get_config("stage=sample")
  assert c.diffusion.latent_scale == 0.0  # the quick preset's "learn it in stage 2"
  with pytest.raises(checks.UserError, match="diffusion.latent_scale"):
    config_checks.check_config(c, adopted=True)
  c.t2i.sd_weights = "sd"  # latents scaled by the SD checkpoint's scaling_factor instead
  config_checks.check_config(c, adopted=True)
