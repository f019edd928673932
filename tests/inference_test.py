"""The inference layer: saved architectures, the Python API, windows, streamed BigTIFFs,
size checks, and 2 processes x 2 devices == 1 process x 4 devices for sampling, pFID and
`Model.render` / `reconstruct` of fewer and more images than devices."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest
import tifffile
from PIL import Image

from configs import demo, tiny
from infd_jax import checks, jobs, sharding, trained
from infd_jax.evaluation import pfid
from infd_jax.models import renderer as renderer_lib
from infd_jax.rendering import pixels, stream, tiling
from tests import processes

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sample_config(trained, out_dir, **sample):
  c = tiny.get_config()
  c.stage = "sample"
  c.ckpt.update(ae_checkpoint=str(trained), dm_checkpoint=str(trained))
  c.sample.update(out_dir=str(out_dir), **sample)
  return c


def test_sample_reads_the_saved_architecture_and_names_a_contradicting_flag(
    tiny_trained, tmp_path):
  c = _sample_config(tiny_trained, tmp_path / "out", num_samples=3, batch_size=2,
                     sizes=(32, "24x40"))
  jobs.run(c, tmp_path / "run")  # tiny's z_channels=3 etc. are not what was trained
  for folder, (w, h) in (("32", (32, 32)), ("24x40", (40, 24))):
    files = sorted((tmp_path / "out" / folder).glob("*.png"))
    assert [f.name for f in files] == ["0.png", "1.png", "2.png"]
    assert Image.open(files[0]).size == (w, h)
  with pytest.raises(checks.UserError, match=r"--config.ae.z_channels=3 contradicts the stage-1"):
    jobs.run(c, tmp_path / "run", overrides=["ae.z_channels"])


@pytest.mark.parametrize("sizes,window,message", [
    ((0,), (), "positive"), (("-4x8",), (), "positive"), ((), (), "config.sample.sizes"),
    (("12xx4",), (), "not N or HxW"), ((32,), (0, 0, 0, 4), "window"),
    ((32,), (30, 0, 4, 4), "not inside"), ((32,), (1, 2, 3), "window"),
])
def test_bad_sizes_and_windows_are_refused_before_any_model_work(tmp_path, sizes, window,
                                                                  message):
  c = _sample_config(tmp_path / "no_checkpoints", tmp_path, sizes=sizes, window=window)
  with pytest.raises(checks.UserError, match=message):  # not "no stage-1 checkpoint"
    jobs.run(c, tmp_path / "run")


def _readme_example() -> str:
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index("## Python API"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs_and_windows_equal_crops(tiny_trained):
  code = _readme_example().replace('"workdir/demo"', repr(str(tiny_trained)))
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  model, z, images, crop = scope["model"], scope["z"], scope["images"], scope["crop"]
  assert z.shape == (4, 16, 16, 4) and images.shape == (4, 128, 128, 3)
  assert -1 <= images.min() < images.max() <= 1
  np.testing.assert_array_equal(model.sample(4, seed=0), z)       # reproducible per seed
  assert np.abs(model.sample(4, seed=1) - z).min() > 0
  full = model.render(z, (256, 384))
  np.testing.assert_array_equal(crop, full[:, 64:128, 128:224])    # window == crop of full
  assert scope["recon"].shape == (2, 192, 192, 3) and np.isfinite(scope["recon"]).all()
  assert scope["latents"].shape == (2, 64, 64, 4)


def _toy_render_fn(params, phi, coord, cell):
  """A cheap stand-in network whose output depends on the tile (like GroupNorm)."""
  x = renderer_lib.renderer_input(phi, coord, cell)[..., :3] * params["scale"]
  return x - x.mean(axis=(1, 2), keepdims=True) * 0.5


def test_streamed_bigtiff_equals_the_in_memory_render(tmp_path):
  renderer = tiling.TiledRenderer(_toy_render_fn, tile=256, pad=8, tiles_per_call=16)
  mesh = sharding.make_mesh(-1, 1)
  phi = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 4)),
                       sharding.replicated(mesh))
  params = {"scale": jnp.float32(0.7)}
  path = tmp_path / "big.tif"
  stream.write_bigtiff(path, renderer, params, phi, (4096, 4096), compression=None)
  with tifffile.TiffFile(path) as tif:
    assert tif.is_bigtiff
    series = tif.series[0]
    assert [lvl.shape for lvl in series.levels] == [(4096 >> k, 4096 >> k, 3) for k in range(5)]
    assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
    level0, last = series.levels[0].asarray(), series.levels[-1].asarray()
  np.testing.assert_array_equal(level0, pixels.to_uint8(
      renderer.render_image(params, phi, (4096, 4096))[0]))
  np.testing.assert_array_equal(last, pixels.to_uint8(
      renderer.render_image(params, phi, (256, 256))[0]))


def _cheap_extractor():
  """A real FeatureExtractor (jitted, batched) on mean colour and its spread: quick to build."""
  fn = lambda params, x: jnp.concatenate([x.mean((1, 2)), x.std((1, 2))], -1) / 255.0
  return pfid._build("meanstd", 6, 4, fn, {}, weights=__file__)  # pylint: disable=protected-access


def _write_images(folder, n, seed, size=32):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(folder / f"{i:03d}.png")


def test_real_statistics_are_cached_reused_and_invalidated(tmp_path):
  real, cache = tmp_path / "real", tmp_path / "cache"
  _write_images(real, 7, 0)
  ext = _cheap_extractor()
  first, cached = pfid.real_stats(str(real), (32, 16), ext, seed=1, cache_dir=cache)
  assert not cached and len(list(cache.glob("*.npz"))) == 1
  again, cached = pfid.real_stats(str(real), (32, 16), ext, seed=1, cache_dir=cache)
  assert cached
  for p in (32, 16):
    np.testing.assert_array_equal(again[p].scatter, first[p].scatter)
  # Reference statistics of the 32-crops (the whole images): np.mean / np.cov.
  feats = np.concatenate([ext(np.stack([np.asarray(Image.open(f)) for f in
                                         sorted(real.glob("*.png"))][i:i + 4]))
                          for i in range(0, 7, 4)])
  np.testing.assert_allclose(first[32].mean, feats.mean(0), rtol=1e-12)
  np.testing.assert_allclose(first[32].mean_cov()[1], np.cov(feats, rowvar=False), rtol=1e-9,
                             atol=1e-15)
  _write_images(real / "more", 1, 5)  # the dataset changes: recomputed, a second cache file
  changed, cached = pfid.real_stats(str(real), (32, 16), ext, seed=1, cache_dir=cache)
  assert not cached and changed[32].count == 8 and len(list(cache.glob("*.npz"))) == 2


def test_two_processes_write_samples_pfid_and_render_as_one(tiny_trained, tmp_path):
  real = tmp_path / "real"
  _write_images(real, 9, 1)  # 9 real, 10 generated: uneven shares over 2 processes
  worker = [sys.executable, "-m", "tests.inference_worker", str(tiny_trained)]
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  workers = [processes.Worker(worker + [str(tmp_path / "one"), str(real)],
                              processes.cpu_env(4, optimize=False), ROOT)]
  workers += [processes.Worker(worker + [str(tmp_path / "two"), str(real), address, "2", str(i)],
                               processes.cpu_env(2, optimize=False), ROOT) for i in range(2)]
  one, two_a, two_b = (processes.result(out) for out, _ in processes.finish_all(workers, 400))
  names = [f"{i}.png" for i in range(10)]
  for run in ("one", "two"):
    assert sorted(os.listdir(tmp_path / run / "samples" / "32"), key=lambda n: int(n[:-4])) == names
  for name in names:
    assert (tmp_path / "one/samples/32" / name).read_bytes() == \
        (tmp_path / "two/samples/32" / name).read_bytes(), name
  assert two_a["scores"] == two_b["scores"]
  for k, v in one["reference"].items():
    np.testing.assert_allclose(one["scores"][k], v, rtol=1e-6)
    np.testing.assert_allclose(two_a["scores"][k], v, rtol=1e-6)
  # Model.render and reconstruct of fewer and more images than the 4 devices: what every
  # process of 2 x 2 devices gets equals 1 x 4 (each image rendered by one device, or its
  # tiles spread over the 4, the same computations either way). A sum of copies gathered
  # from the processes would double the images.
  with np.load(tmp_path / "one" / "model_0.npz") as f:
    want = dict(f)
  for process in range(2):
    with np.load(tmp_path / "two" / f"model_{process}.npz") as got:
      assert sorted(got) == sorted(want)
      for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=f"{key} on process {process}")
  for n in (1, 3, 5):
    assert want[f"render_{n}"].shape == (n, 32, 32, 3)
    np.testing.assert_array_equal(want[f"render_{n}"], want["render_5"][:n])
  for n in (3, 5):
    assert want[f"reconstruct_{n}"].shape == (n, 32, 24, 3)
  assert want["render_5"].std() > 0.01 and np.abs(want["render_5"]).max() <= 1


def test_import_infd_jax_is_light():
  out = subprocess.run([sys.executable, "-c", "import sys, infd_jax; print(sorted(m for m in "
                        "('jax', 'flax', 'orbax', 'tensorflow') if m in sys.modules))"],
                       cwd=ROOT, env=processes.cpu_env(1), capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[]"


def test_a_checkpoint_older_than_an_option_reads_as_the_official_default(tiny_trained, tmp_path):
  # A checkpoint saved before `ae.mid_attention` existed has no such key; its networks
  # were built with the official attention, whatever the current config says.
  shutil.copytree(tiny_trained / "checkpoints_ae", tmp_path / "checkpoints_ae")
  for saved in (tmp_path / "checkpoints_ae").glob("*/config/metadata"):
    config = json.loads(saved.read_text())
    del config["ae"]["mid_attention"]
    saved.write_text(json.dumps(config))
  c = demo.get_config("stage=sample")
  assert not c.ae.mid_attention
  assert trained.Source(tmp_path).architecture("ae")["ae"]["mid_attention"] is True
  assert trained.adopt_architecture(c, tmp_path).ae.mid_attention is True
