"""Stable Diffusion import and modules against the real diffusers / transformers outputs.

The fixtures (tests/fixtures/sd, made by its make_fixture.py with diffusers
0.42.1 and transformers 5.25.0) hold tiny random SD 1.x- and 2.x-shaped models
as diffusers folders and as single original files, and the libraries' outputs.
"""

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infd_jax.clip.text import TextTransformer
from infd_jax.convert import sd
from infd_jax.convert.architecture import ConversionError
from infd_jax.diffusion import prediction, samplers, schedules, solvers
from infd_jax.models.sd_unet import SDUNet
from infd_jax.models.sd_vae import KLAutoencoder

HERE = pathlib.Path(__file__).parent / "fixtures" / "sd"
# What the shapes of the tiny single files cannot tell (the released models' defaults differ).
OVERRIDES = {
    "sd1": {"unet": {"num_heads": 2, "norm_groups": 4}, "vae": {"norm_groups": 4},
            "text_head_width": 16},
    "sd2": {"unet": {"num_heads": -1, "num_head_channels": 4, "norm_groups": 4},
            "vae": {"norm_groups": 4}, "text_head_width": 12, "prediction": "v"},
}
SINGLE_FILE = {"sd1": "sd1.safetensors", "sd2": "sd2.ckpt"}


@functools.cache
def outputs() -> dict[str, np.ndarray]:
  with np.load(HERE / "outputs.npz") as f:
    return {k: f[k] for k in f.files}


@functools.cache
def imported(name: str):
  return sd.read(HERE / name)


def assert_close(got, want, rel=1e-4):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < rel, f"relative error {err:.2e}"


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_single_file_imports_the_same_weights_and_architecture_as_the_diffusers_folder(name):
  trees, arch = imported(name)
  trees_single, arch_single = sd.read(HERE / SINGLE_FILE[name], OVERRIDES[name])
  assert arch_single == arch
  flat = jax.tree_util.tree_flatten_with_path(trees)[0]
  flat_single = jax.tree_util.tree_flatten_with_path(trees_single)[0]
  assert [p for p, _ in flat] == [p for p, _ in flat_single]
  for (path, a), (_, b) in zip(flat, flat_single):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_architectures_read_from_the_diffusers_configs():
  _, arch1 = imported("sd1")
  _, arch2 = imported("sd2")
  assert arch1["unet"]["attention_resolutions"] == (1,)
  assert (arch1["unet"]["num_heads"], arch1["unet"]["num_head_channels"]) == (2, -1)
  assert (arch2["unet"]["num_heads"], arch2["unet"]["num_head_channels"]) == (-1, 4)
  assert arch2["unet"]["num_res_blocks"] == 2 and arch2["unet"]["attention_resolutions"] == (1, 2)
  assert (arch1["prediction"], arch2["prediction"]) == ("eps", "v")
  assert arch1["text"]["quick_gelu"] and not arch2["text"]["quick_gelu"]


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_unet_matches_diffusers(name):
  trees, arch = imported(name)
  o = outputs()
  out = jax.jit(SDUNet(**arch["unet"]).apply)({"params": trees["unet"]}, o[f"{name}_unet_x"],
                                              o[f"{name}_unet_t"], o[f"{name}_unet_ctx"])
  assert_close(out, o[f"{name}_unet_out"])


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_text_encoder_matches_transformers(name):
  trees, arch = imported(name)
  o = outputs()
  out = jax.jit(TextTransformer(**arch["text"]).apply)({"params": trees["text"]}, o["tokens"])
  assert_close(out, o[f"{name}_text"])


def test_vae_encoder_and_decoder_match_diffusers():
  trees, arch = imported("sd1")
  o = outputs()
  vae = KLAutoencoder(**arch["vae"])
  encode = jax.jit(functools.partial(vae.apply, method="encode"))
  decode = jax.jit(functools.partial(vae.apply, method="decode"))
  mean, logvar = encode({"params": trees["vae"]}, o["images_nhwc"])
  assert_close(mean, o["vae_mean"])
  assert_close(logvar, o["vae_logvar"])
  assert_close(decode({"params": trees["vae"]}, o["vae_z"]), o["vae_decoded"])


def test_scaled_linear_schedule_matches_diffusers():
  np.testing.assert_allclose(schedules.scaled_linear_schedule().alphas_cumprod,
                             outputs()["alphas_cumprod"], rtol=1e-6)


@pytest.mark.parametrize("name,solver", [("sd1", "ddim"), ("sd2", "dpmpp_2m"),
                                         ("sd1", "unipc")])
def test_guided_sampling_matches_the_diffusers_loop(name, solver, monkeypatch):
  """Classifier-free guidance, eps / v and the samplers on SD's schedule, from the same x_T."""
  trees, arch = imported(name)
  o = outputs()
  latents = jnp.asarray(o[f"{name}_loop_latents"])
  monkeypatch.setattr(solvers, "initial_noise", lambda key, shape, sharding: (latents, key))
  sched = schedules.scaled_linear_schedule(**arch["schedule"])
  unet = SDUNet(**arch["unet"])
  model = prediction.as_eps(lambda p, x, t, c: unet.apply({"params": p}, x, t, c), sched,
                            arch["prediction"])
  eps = prediction.guided(model, jnp.asarray(o[f"{name}_loop_cond"]),
                          jnp.asarray(o[f"{name}_loop_uncond"]), 4.0)
  ts = o[f"{name}_{solver}_timesteps"]
  shape = latents.shape
  if solver == "ddim":  # diffusers' "leading" spacing of 4 steps is the official {0, 250, ...}
    np.testing.assert_array_equal(np.sort(ts), samplers.spaced_timesteps(sched, len(ts)))
    run = functools.partial(samplers.ddim_sample, eps, shape=shape, sched=sched,
                            num_steps=len(ts), eta=0.0)
  else:
    fn = {"dpmpp_2m": solvers.dpmpp_2m_sample, "unipc": solvers.unipc_sample}[solver]
    run = functools.partial(fn, eps, shape=shape, sched=sched, timesteps=ts)
  out = jax.jit(run)(trees["unet"], jax.random.PRNGKey(0))
  assert_close(out, o[f"{name}_{solver}_out"], rel=2e-4)


def test_unknown_and_missing_unet_keys_are_listed_by_name():
  broken = _as_original(sd.clip_convert.read_safetensors(HERE / "sd1.safetensors"))
  broken["model.diffusion_model.extra_block.weight"] = np.zeros((2,), np.float32)
  del broken["model.diffusion_model.out.2.bias"]
  _, arch = imported("sd1")
  with pytest.raises(ConversionError) as err:
    sd.to_flax(broken, arch)
  assert "model.diffusion_model.extra_block.weight" in str(err.value)
  assert "unet:params/out_2/bias" in str(err.value)


def _as_original(state: dict) -> dict:
  """The single-file reader's text renaming, applied to an in-memory state dict."""
  text = {k[len("cond_stage_model.transformer."):]: v for k, v in state.items()
          if k.startswith("cond_stage_model.transformer.")}
  rest = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.transformer.")}
  return {**rest, **{"cond_stage_model.model." + k: v
                     for k, v in sd.sd_layout.text_from_hf(text).items()}}


def test_text_keys_unknown_and_missing_are_listed_by_name():
  src = sd.clip_convert.read_safetensors(HERE / "sd1.safetensors")
  broken = _as_original(src)
  del broken["cond_stage_model.model.ln_final.bias"]
  broken["cond_stage_model.model.surprise"] = np.zeros((2,), np.float32)
  _, arch = imported("sd1")
  with pytest.raises(ConversionError) as err:
    sd.to_flax(broken, arch)
  assert "cond_stage_model.model.surprise" in str(err.value)
  assert "text/ln_final/bias" in str(err.value)


def test_cli_writes_a_checkpoint_that_loads_back(tmp_path):
  out = tmp_path / "converted"
  assert sd.main(["--input", str(HERE / "sd2.ckpt"), "--output", str(out), "--arch",
                  json.dumps({k: v for k, v in OVERRIDES["sd2"].items() if k != "prediction"}),
                  "--prediction", "v"]) == 0
  trees, meta = sd.load(out)
  want, arch = imported("sd2")
  assert meta["unet"] == arch["unet"] and meta["prediction"] == "v"
  for a, b in zip(jax.tree.leaves(trees), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
  # SD 2.x single file without its objective: refused before any conversion.
  assert sd.main(["--input", str(HERE / "sd2.ckpt"), "--output", str(tmp_path / "o")]) == 2
  assert "--prediction" in capsys.readouterr().out
  assert not (tmp_path / "o").exists()
  folder = tmp_path / "sd1"
  shutil.copytree(HERE / "sd1", folder)
  (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
      {"beta_schedule": "linear", "beta_start": 0.1, "beta_end": 0.2, "num_train_timesteps": 10}))
  assert sd.main(["--input", str(folder), "--output", str(tmp_path / "o2")]) == 2
  assert "beta_schedule='linear'" in capsys.readouterr().out


def test_v_target_and_eps_from_v_closed_forms():
  """v = sqrt(ab) eps - sqrt(1 - ab) x0 in float64, and eps recovered from (x_t, v)."""
  sched = schedules.scaled_linear_schedule()
  rng = np.random.default_rng(0)
  x0, eps = rng.normal(size=(2, 3, 4, 5, 4))
  t = np.array([0, 500, 999])
  ab = sched.alphas_cumprod[t][:, None, None, None]
  v = np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
  np.testing.assert_allclose(prediction.v_target(sched, jnp.asarray(x0, jnp.float32), t,
                                                 jnp.asarray(eps, jnp.float32)), v, atol=1e-5)
  np.testing.assert_allclose(prediction.eps_from_v(sched, jnp.asarray(x_t, jnp.float32), t,
                                                   jnp.asarray(v, jnp.float32)), eps, atol=1e-5)
