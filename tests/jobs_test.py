"""The jobs end to end on the tiny config: ae -> dm -> sample -> eval, resume, and the CLI."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from infd_jax.configs import tiny
from infd_jax import checkpointing, jobs, sharding
from infd_jax.training import dm_task, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(data_dir, stage, **train):
  c = tiny.get_config()
  c.stage = stage
  c.data.data_dir = str(data_dir)
  c.train.update(**train)
  return c


def _scalar_tags(workdir: pathlib.Path) -> set[str]:
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  tags = set()
  for events in workdir.rglob("events.out.tfevents.*"):
    acc = event_accumulator.EventAccumulator(str(events))
    acc.Reload()
    tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["tensors"])
  return tags


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with a 3-step autoencoder and a 3-step diffusion model."""
  data, work = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("work")
  for stage in ("ae", "dm"):
    c = _config(data, stage, eval_every=3, eval_batches=1)
    c.data.eval_split = "train"  # the demo set has one split; it stands in for validation
    jobs.run(c, work)
  return data, work


def test_stages_write_checkpoints_events_and_latent_cache(trained):
  _, work = trained
  assert checkpointing.Checkpointer(work / "checkpoints_ae").latest_step() == 3
  assert checkpointing.Checkpointer(work / "checkpoints_dm").latest_step() == 3
  assert list((work / "latents").glob("*.npy"))
  tags = _scalar_tags(work)
  assert {"train/l1_loss", "train/adaptive_g_w", "train/psnr", "train/codebook_usage",
          "train/disc_logits_real", "val/perc_loss", "val/psnr", "train/z_dm_loss",
          "val/z_dm_ema_loss", "steps_per_sec"} <= tags, sorted(tags)
  # Each stage is its own TensorBoard run.
  ae_tags, dm_tags = _scalar_tags(work / "ae"), _scalar_tags(work / "dm")
  assert "train/psnr" in ae_tags and "train/psnr" not in dm_tags
  assert "train/z_dm_loss" in dm_tags and "train/z_dm_loss" not in ae_tags


def test_sample_job_writes_requested_sizes_including_non_square(trained):
  data, work = trained
  c = _config(data, "sample")
  c.sample.update(num_samples=3, batch_size=2, sizes=(32, "24x40"))
  jobs.run(c, work)
  for folder, (w, h) in (("32", (32, 32)), ("24x40", (40, 24))):
    files = sorted((work / "samples" / folder).glob("*.png"))
    assert [f.name for f in files] == ["0.png", "1.png", "2.png"]
    image = Image.open(files[0])
    assert image.size == (w, h) and image.mode == "RGB"


def test_eval_job_reports_reconstruction_and_scale_consistency(trained):
  data, work = trained
  c = _config(data, "eval")
  c.data.eval_split = "train"
  c.eval.update(recon_resolutions=(32, 48), scale_consistency_base=16, scale_factors=(2,),
                max_images=2)
  jobs.run(c, work)
  results = json.loads((work / "eval.json").read_text())
  assert set(results) >= {"recon_psnr_32", "recon_lpips_48", "scale_psnr_x2", "scale_lpips_x2"}
  assert all(np.isfinite(v) for v in results.values())


def test_dm_resumed_run_equals_straight_run(trained, tmp_path):
  data, work = trained
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  for wd, steps in ((straight, 4), (resumed, 2), (resumed, 4)):
    c = _config(data, "dm", dm_steps=steps)
    c.ckpt.ae_checkpoint = str(work)
    jobs.run(c, wd)
  c = _config(data, "dm")
  mesh = sharding.make_mesh(-1, 1)
  abstract, _, _ = loop.initial_state(dm_task.init_fn(c), mesh, (), 0)
  a = checkpointing.restore_params(straight / "checkpoints_dm", abstract)
  b = checkpointing.restore_params(resumed / "checkpoints_dm", abstract)
  assert int(a.step) == int(b.step) == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_missing_stage1_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(jobs.UserError, match="no stage-1 checkpoint"):
    jobs.run(_config(tmp_path / "data", "dm"), tmp_path / "empty")


def _main(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "infd_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (("--workdir=w",), "--config"),
    (("--config=configs/tiny.py", "--workdir=w", "--config.trian.ae_steps=1"), "trian"),
    (("--config=configs/nope.py", "--workdir=w"), "nope.py"),
    (("--config=configs/tiny.py", "--workdir=w", "--config.stage=train"), "config.stage"),
])
def test_cli_errors_are_one_line_with_nonzero_exit(args, message):
  out = _main(*args)
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.startswith("infd_jax: error")]
  assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr


def test_helpfull_lists_flags():
  out = _main("--helpfull")
  assert out.returncode in (0, 1), out.stderr  # absl's help flags exit 1 after printing
  for flag in ("--config", "--workdir", "--coordinator_address", "--[no]multihost"):
    assert flag in out.stdout
