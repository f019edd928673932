"""The jobs end to end on the tiny config: ae -> dm -> sample -> eval, resume, and the CLI."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from infd_jax import builders, checkpointing, checks, jobs, sharding
from infd_jax.training import ae_task, dm_task, loop

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
def trained(tiny_data, tiny_trained, tmp_path_factory):
  """The data folder and a copy, which this file's jobs write into, of the session's workdir
  with a 3-step autoencoder and a 3-step diffusion model, each evaluated at step 3
  (`tiny_trained`)."""
  work = tmp_path_factory.mktemp("jobs") / "work"
  shutil.copytree(tiny_trained, work)
  return tiny_data, work


def test_stages_write_checkpoints_events_and_latent_cache(trained):
  _, work = trained
  assert checkpointing.Checkpointer(work / "checkpoints_ae").latest_step() == 3
  assert checkpointing.Checkpointer(work / "checkpoints_dm").latest_step() == 3
  assert list((work / "latents").glob("*/p*.npy"))
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


@pytest.mark.parametrize("sampler,spacing", [("dpmpp_2m", "uniform"), ("unipc", "logsnr")])
def test_sample_job_runs_with_the_few_step_samplers(trained, tmp_path, sampler, spacing):
  data, work = trained
  c = _config(data, "sample")
  c.sample.update(num_samples=2, batch_size=2, sizes=(32,), sampler=sampler, spacing=spacing,
                  out_dir=str(tmp_path))
  jobs.run(c, work)
  images = [np.asarray(Image.open(tmp_path / "32" / f"{i}.png")) for i in range(2)]
  assert all(image.shape == (32, 32, 3) for image in images)
  assert np.abs(images[0].astype(int) - images[1]).mean() > 1  # two different samples


def test_eval_job_reports_reconstruction_and_scale_consistency(trained):
  data, work = trained
  c = _config(data, "eval")
  c.data.eval_split = "train"
  c.eval.update(recon_resolutions=(32, 48), scale_consistency_base=16, scale_factors=(2,),
                max_images=3, batch_size=2)  # batches of 2 and 1, fewer than the 8 devices
  jobs.run(c, work)
  results = json.loads((work / "eval.json").read_text())
  assert set(results) >= {"recon_psnr_32", "recon_lpips_48", "scale_psnr_x2", "scale_lpips_x2"}
  assert all(np.isfinite(v) for v in results.values())
  # The reconstruction PSNR is that of Model.reconstruct (quantized as sampling does) against
  # the LANCZOS ground truth, recomputed here in float64 numpy.
  from infd_jax import inference  # pylint: disable=g-import-not-at-top
  from infd_jax.data import image_io, sources  # pylint: disable=g-import-not-at-top
  model = inference.load(work)
  assert model.config.sample.quantize
  records = sources.open_split(str(data), "demo", "default", "train")
  photos = [image_io.decode_rgb(records[i]["image"]) for i in range(3)]
  resized = lambda side: np.stack([np.asarray(p.resize((side, side), Image.LANCZOS))
                                   for p in photos])
  for res in (32, 48):
    recon = model.reconstruct(resized(32), res).astype(np.float64)
    err = (recon - (resized(res).astype(np.float64) / 127.5 - 1)) / 2
    want = np.mean(-10 * np.log10(np.mean(err ** 2, axis=(1, 2, 3))))
    np.testing.assert_allclose(results[f"recon_psnr_{res}"], want, rtol=1e-4)


def test_ae_visualiser_shows_the_models_predictions_on_its_fixed_crops(trained, tiny_config):
  """Through Model with the state's parameters, the pairs are the autoencoder's own forward
  pass on each crop's coordinates (the training prediction) next to the crop."""
  import types  # pylint: disable=g-import-not-at-top
  from infd_jax import inference  # pylint: disable=g-import-not-at-top
  from infd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from infd_jax.evaluation import writers  # pylint: disable=g-import-not-at-top
  from infd_jax.training import on_device  # pylint: disable=g-import-not-at-top
  _, work = trained
  c = tiny_config("ae")
  params = inference.load(work).ae_params
  logged = {}
  writer = types.SimpleNamespace(write_images=lambda step, images: logged.update(images))
  ae_task.make_visualizer(c, sharding.make_mesh(-1, 1))(
      types.SimpleNamespace(gen_params=params), 3, writer)
  batch = next(iter(pipeline.make_ae_dataset(
      pipeline.stage_config(c.data, "ae") | {"num_workers": 0}, global_batch_size=8,
      seed=c.seed + 1)))
  expanded = on_device.ae_batch(batch)
  pred = builders.autoencoder(c).apply({"params": params}, expanded["inp"], expanded["coord"],
                                       expanded["cell"]).pred
  pairs = np.stack([np.asarray(pred), np.asarray(expanded["gt"])], axis=1).reshape(16, 32, 32, 3)
  want = writers.make_image_grid(pairs, ncols=4, min_side=128)
  got = logged["ae/recon_pred_gt"][0]
  assert got.shape == want.shape and "ae/center_zoom_128" in logged
  # uint8 levels; Model.encode reads uint8 as x / 127.5 - 1, training as x * 2 / 255 - 1.
  assert np.abs(got.astype(int) - want).max() <= 1
  assert np.mean(got == want) > 0.99


def test_dm_resumed_run_equals_straight_run(tiny_trained, tiny_config, tmp_path):
  """Stage 2 resumed from the step-2 checkpoint of the session's straight 3-step run
  (`tiny_trained`) ends in that run's step-3 state: parameters, optimizer, EMA and step, after
  the batch and noise of step 3 (data position and RNG restored)."""
  straight = tiny_trained
  resumed = pathlib.Path(shutil.copytree(straight, tmp_path / "resumed"))
  shutil.rmtree(resumed / "checkpoints_dm" / "3")
  c = tiny_config("dm")
  jobs.run(c, resumed)
  mesh = sharding.make_mesh(-1, 1)
  abstract, _, _ = loop.initial_state(dm_task.init_fn(c), mesh, (), 0)
  a = checkpointing.Checkpointer(straight / "checkpoints_dm", read_only=True).restore(abstract)[1]
  b = checkpointing.Checkpointer(resumed / "checkpoints_dm", read_only=True).restore(abstract)[1]
  assert int(a.step) == int(b.step) == 3
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_missing_stage1_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checks.UserError, match="no stage-1 checkpoint"):
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


def test_batch_that_does_not_split_over_the_devices_stops_before_any_work(tmp_path):
  workdir = tmp_path / "work"
  c = _config(tmp_path / "data", "ae", ae_batch_size=6)  # 8 devices here
  with pytest.raises(checks.UserError) as e:
    jobs.run(c, workdir)
  message = str(e.value)
  assert "\n" not in message
  for part in ("train.ae_batch_size=6", "8 devices", "data=8 x fsdp=1", "1 processes",
               "use --config.train.ae_batch_size=8,", "or run on 2 devices"):
    assert part in message, message
  assert not workdir.exists() and not (tmp_path / "data").exists()  # nothing read or compiled


def test_gs_workdir_is_never_made_local(trained, tiny_config, tmp_path, monkeypatch):
  """A `gs://` workdir (an in-memory gcs filesystem here) holds the run's latent cache,
  events and checkpoint folder; nothing lands on local disk."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  from tests import fake_gcs  # pylint: disable=g-import-not-at-top
  _, work = trained
  # orbax asks the GCS bucket API (google-cloud-storage) whether the bucket has a
  # hierarchical namespace; the fake bucket is a flat one.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.chdir(tmp_path)
  c = tiny_config("dm", dm_steps=0)  # orbax's array writes need a real GCS endpoint
  c.ckpt.ae_checkpoint = str(work)
  with fake_gcs.installed() as fs:
    jobs.run(c, "gs://bucket/run")
    objects = set(fs.store)
    dirs = set(fs.pseudo_dirs)
  assert not list(tmp_path.iterdir())  # no local gs:/bucket/run
  assert any(k.startswith("bucket/run/dm/events.out.tfevents.") for k in objects), objects
  metas = [k for k in objects if k.startswith("bucket/run/latents/") and k.endswith("meta.json")]
  assert len(metas) == 1 and json.loads(fs.store[metas[0]].getvalue())["num_records"] == 9
  assert "bucket/run/checkpoints_dm" in dirs


def test_sample_and_eval_read_and_write_a_gs_workdir(trained, tmp_path, monkeypatch):
  """Samples, pFID statistics and eval.json go to a `gs://` workdir (an in-memory gcs
  filesystem), the real images are read from `gs://`, and nothing lands on local disk."""
  from infd_jax.evaluation import pfid  # pylint: disable=g-import-not-at-top
  from tests import fake_gcs  # pylint: disable=g-import-not-at-top
  data, work = trained
  local = tmp_path / "local"
  (local / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  names = ["a.png", "b.png", "sub/c.png", "sub/d.png", "e.png"]
  for name in names:
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(local / name)
  run_dir = tmp_path / "cwd"
  run_dir.mkdir()
  monkeypatch.chdir(run_dir)
  with fake_gcs.installed() as fs:
    for name in names:
      fs().pipe(f"gs://bucket/real/{name}", (local / name).read_bytes())
    c = _config(data, "sample")
    c.ckpt.update(ae_checkpoint=str(work), dm_checkpoint=str(work))
    c.sample.update(num_samples=3, batch_size=2, sizes=(32,))
    jobs.run(c, "gs://bucket/run")
    samples = {k: fs.store[k].getvalue() for k in fs.store if k.startswith("bucket/run/samples/")}
    c = _config("", "eval")
    c.ckpt.update(ae_checkpoint=str(work), dm_checkpoint=str(work))
    c.eval.update(real_dir="gs://bucket/real", resolution=32, patch_sizes=(16,), batch_size=4)
    jobs.run(c, "gs://bucket/run")
    results = json.loads(fs.store["bucket/run/eval.json"].getvalue())
    stats = [k for k in fs.store if k.startswith("bucket/run/fid_stats/real_")]
  assert not list(run_dir.iterdir())  # no local gs:/bucket/...
  assert sorted(samples) == [f"bucket/run/samples/32/{i}.png" for i in range(3)]
  assert len(stats) == 1
  # The same folders read from local disk give the same distance.
  fake = tmp_path / "fake"
  for key, png in samples.items():
    (fake / key.split("/")[-1]).parent.mkdir(exist_ok=True)
    (fake / key.split("/")[-1]).write_bytes(png)
  expected = pfid.patch_fid_folders(str(local), str(fake), pfid.make_feature_extractor(None, 4),
                                    seed=c.seed, patch_sizes=(16,))
  assert set(results) == {"pfd_vgg16_16_32"}
  np.testing.assert_allclose(results["pfd_vgg16_16_32"], expected["pfd_vgg16_16_32"], rtol=1e-6)


def test_latents_of_a_changed_autoencoder_are_not_reused(trained, tiny_config, tmp_path):
  from infd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  _, work = trained
  work = pathlib.Path(shutil.copytree(work, tmp_path / "work"))
  jobs.run(tiny_config("ae", ae_steps=4), work)  # the autoencoder trains on
  # The data settings of the first stage-2 run: only the AE changed.
  c = tiny_config("dm", dm_steps=4)
  jobs.run(c, work)  # and stage 2 continues on it
  # The newest latents on disk must be the encodings of the step-4 autoencoder.
  newest = max((work / "latents").rglob("*.npy"), key=lambda f: f.stat().st_mtime_ns)
  cached = np.concatenate([np.load(f) for f in sorted(newest.parent.glob("*.npy"))])
  mesh = sharding.make_mesh(-1, 1)
  images = np.concatenate([b["inp"] for b in pipeline.make_dm_dataset(
      pipeline.stage_config(c.data, "dm") | dict(shuffle=False, num_epochs=1),
      global_batch_size=1, seed=0)])
  abstract, _, _ = loop.initial_state(ae_task.init_fn(c), mesh, (), 0)
  encode = lambda step: np.asarray(dm_task.encode_latents(
      builders.autoencoder(c), checkpointing.Checkpointer(
          work / "checkpoints_ae", read_only=True).restore_fields(
              {"gen_params": abstract.gen_params}, step=step)["gen_params"], images))
  expected, stale = encode(4), encode(3)
  assert np.abs(expected - stale).max() > 1e-2  # one more step moves the latents
  assert cached.shape == expected.shape
  np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-5)


def test_condition_job_refuses_a_known_image_that_does_not_fit_its_box(trained, tmp_path):
  """(The job's guided outputs are tested on 2 processes in condition_test.py.)"""
  data, work = trained
  Image.fromarray(np.zeros((16, 16, 4), np.uint8), "RGBA").save(tmp_path / "known.png")
  c = _config(data, "condition")
  c.condition.update(sizes=(32,), out_dir=str(tmp_path / "out"))
  c.condition.regions = json.dumps([{"kind": "known", "size": 32, "box": [0, 0, 8, 8],
                                     "image": str(tmp_path / "known.png")}])
  message = r"regions\[0\]: known image .* is 16x16, the box is 8x8"
  with pytest.raises(checks.UserError, match=message):
    jobs.run(c, work)
