"""Trained parameters on disk: one module names checkpoint folders, config drift stops with
every checkpoint intact, and the latent scale a stage learns is read from its checkpoint."""

import ast
import json
import pathlib
import shutil

import numpy as np
import pytest

from infd_jax import checks, jobs, trained
from configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _strings(tree: ast.AST) -> list[str]:
  """String constants of a module, docstrings left out."""
  docs = {id(n.body[0].value) for n in ast.walk(tree)
          if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
          and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
  return [n.value for n in ast.walk(tree)
          if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_only_the_trained_module_names_checkpoint_folders():
  naming = {path.relative_to(ROOT).as_posix() for path in (ROOT / "infd_jax").rglob("*.py")
            if any("checkpoints_" in s for s in _strings(ast.parse(path.read_text())))}
  assert naming == {"infd_jax/trained.py"}


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_config_drift_stops_with_every_checkpoint_intact(tiny_trained, tmp_path):
  work = tmp_path / "work"
  shutil.copytree(tiny_trained / "checkpoints_ae", work / "checkpoints_ae")
  before = _files(work / "checkpoints_ae")
  c = tiny.get_config()
  c.data.data_dir = str(tmp_path / "data")
  c.ae.update(z_channels=4, num_codes=16)  # the fixture's architecture: only the schedule drifts
  c.optim.cosine_decay = True
  with pytest.raises(checks.UserError) as e:
    jobs.run(c, work)
  message = str(e.value)
  assert "\n" not in message and "optim.cosine_decay=True (checkpoint False)" in message, message
  assert "not in the checkpoint" in message and "step 3" in message, message
  assert _files(work / "checkpoints_ae") == before  # every step kept, none renamed
  assert sorted(p.name for p in (work / "checkpoints_ae").iterdir()) == ["2", "3"]


def _learned_files(work: pathlib.Path) -> list[pathlib.Path]:
  return sorted((work / "checkpoints_dm").glob("*/learned/metadata"))


def _sample_config(work):
  c = tiny.get_config("stage=sample")
  c.ckpt.update(ae_checkpoint=str(work), dm_checkpoint=str(work))
  return c


def test_the_learned_latent_scale_is_saved_with_the_checkpoint_not_the_config(tiny_trained,
                                                                              tmp_path):
  work = tmp_path / "work"
  c = tiny.get_config("stage=dm")
  c.data.data_dir = str(tmp_path / "data")
  c.ckpt.ae_checkpoint = str(tiny_trained)
  c.diffusion.latent_scale = 0.0  # 1 / std of the cached latents, learned when stage 2 starts
  c.train.update(dm_steps=1, ckpt_every=1)
  jobs.run(c, work)
  z = np.concatenate([np.load(f) for f in sorted((work / "latents").glob("*/p*.npy"))])
  source = trained.Source(work)
  assert source.saved_config("dm")["diffusion"]["latent_scale"] == 0.0  # the user's setting
  np.testing.assert_allclose(source.learned("dm")["latent_scale"],
                             1.0 / z.astype(np.float64).std(), rtol=1e-9)
  sample = _sample_config(work)
  sample.ckpt.ae_checkpoint = str(tiny_trained)
  np.testing.assert_allclose(trained.adopt_architecture(sample, work).diffusion.latent_scale,
                             1.0 / z.astype(np.float64).std(), rtol=1e-9)


def test_sampling_reads_the_scale_of_the_checkpoint_and_of_older_checkpoints(tiny_trained,
                                                                             tmp_path):
  work = tmp_path / "work"
  for stage in ("ae", "dm"):
    shutil.copytree(tiny_trained / f"checkpoints_{stage}", work / f"checkpoints_{stage}")
  for f in _learned_files(work):
    f.write_text(json.dumps({"latent_scale": 0.5}))
  assert trained.adopt_architecture(_sample_config(work), work).diffusion.latent_scale == 0.5
  with pytest.raises(checks.UserError, match=r"--config.diffusion.latent_scale=2.0 contradicts"):
    c = _sample_config(work)
    c.diffusion.latent_scale = 2.0
    trained.adopt_architecture(c, work, overrides=["diffusion.latent_scale"])
  # Checkpoints written before the `learned` item kept the resolved scale in their config.
  for f in _learned_files(work):
    shutil.rmtree(f.parent)
  for f in (work / "checkpoints_dm").glob("*/config/metadata"):
    saved = json.loads(f.read_text())
    saved["diffusion"]["latent_scale"] = 0.75
    f.write_text(json.dumps(saved))
  assert trained.Source(work).learned("dm") == {"latent_scale": 0.75}
  assert trained.adopt_architecture(_sample_config(work), work).diffusion.latent_scale == 0.75


def test_a_stage_1_workdir_loads_and_renders_without_a_latent_scale(tiny_trained, tmp_path):
  """Only a stage-2 checkpoint learns the latent scale; stage 1 alone must still load."""
  import infd_jax  # pylint: disable=g-import-not-at-top
  work = tmp_path / "work"
  shutil.copytree(tiny_trained / "checkpoints_ae", work / "checkpoints_ae")
  for f in (work / "checkpoints_ae").glob("*/config/metadata"):
    saved = json.loads(f.read_text())
    saved["diffusion"]["latent_scale"] = 0.0  # "learn it in stage 2", as the demo configs say
    f.write_text(json.dumps(saved))
  model = infd_jax.load(work)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  assert model.reconstruct(images, 48).shape == (2, 48, 48, 3)
  with pytest.raises(checks.UserError, match="no stage-2"):
    model.sample(1, seed=0)
