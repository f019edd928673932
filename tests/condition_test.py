"""Guided sampling through the `condition` job and the Python API on the tiny trained model:
the job on 2 processes x 2 devices writes each of 3 samples exactly once, and writes what
`Model.condition` returns on 1 process x 4 devices, both with DPS from noise and started
from an image's latent with data consistency; guidance moves the known pixels towards
their values (numpy float64); bad regions and settings are one-line UserErrors."""

import json
import os
import pathlib
import sys

import jax
import numpy as np
import portpicker
import pytest
from PIL import Image

import infd_jax
from infd_jax import builders, checks, sharding
from infd_jax.rendering import pixels
from tests import processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE, BOX = (32, 32), (4, 2, 24, 28)  # the known box, in the 32 x 32 images the job writes
N, SEED = 3, 4                          # as tests/condition_worker.py: 3 samples on 4 devices


@pytest.fixture(scope="module")
def model(tiny_trained):
  """The tiny trained model on 4 of the 8 devices: a 1-process x 4-device run."""
  return infd_jax.load(tiny_trained, mesh=sharding.make_mesh(devices=jax.devices()[:4]))


def _known_region(model, folder: pathlib.Path
                  ) -> tuple[dict, np.ndarray, np.ndarray, pathlib.Path]:
  """A `known` region whose pixels the decoder can reach: a box of the render of a random
  latent, half of its pixels known (alpha). Returns (region, pixels in [-1, 1], mask, the
  whole render's file)."""
  rng = np.random.default_rng(5)
  z = rng.normal(size=(N, *builders.latent_shape(model.config))).astype(np.float32)
  top, left, h, w = BOX
  whole = pixels.to_uint8(model.render(z, SIZE))[0]
  known = whole[top:top + h, left:left + w]
  mask = rng.random((h, w)) < 0.5
  Image.fromarray(np.dstack([known, 255 * mask.astype(np.uint8)]), "RGBA").save(
      folder / "known.png")
  Image.fromarray(whole).save(folder / "whole.png")
  region = {"kind": "known", "size": list(SIZE), "box": list(BOX),
            "image": str(folder / "known.png"), "scale": 10}
  return region, known.astype(np.float64) / 127.5 - 1, mask, folder / "whole.png"


def _masked_rmse(images: np.ndarray, known: np.ndarray, mask: np.ndarray) -> np.ndarray:
  top, left, h, w = BOX
  err = (images[:, top:top + h, left:left + w].astype(np.float64) - known) ** 2
  return np.sqrt((err * mask[..., None]).sum(axis=(1, 2, 3)) / (3 * mask.sum()))


def _written(folder: pathlib.Path) -> np.ndarray:
  """The job's 32 x 32 samples in row order; asserts each was written once, by its owner:
  3 samples over 4 devices, so process 0 holds rows 0 and 1, process 1 row 2 (and padding)."""
  written = [sorted(os.listdir(folder / f"p{i}" / "32")) for i in range(2)]
  assert written == [["0.png", "1.png"], ["2.png"]]
  return np.stack([np.asarray(Image.open(folder / f"p{i}" / "32" / name))
                   for i, files in enumerate(written) for name in files])


def test_job_on_two_processes_writes_each_sample_once_as_the_api_returns_it(
    model, tiny_trained, tmp_path):
  region, known, mask, whole = _known_region(model, tmp_path)
  # Two jobs in one launch: DPS from noise (the defaults), and started at half of the DDIM
  # iterations from the latent of the whole image the known box was cut from, with two
  # Adam steps (learning rate 0.5) of data consistency per guided iteration instead of DPS.
  started = {"init_image": str(whole), "start": 0.5, "fit_steps": 2, "fit_lr": 0.5}
  jobs = {"dps": {"regions": json.dumps([region])},
          "started": {"regions": json.dumps([region]), **started}}
  worker = [sys.executable, "-m", "tests.condition_worker", str(tiny_trained), str(tmp_path),
            json.dumps(jobs), f"127.0.0.1:{portpicker.pick_unused_port()}", "2"]
  workers = [processes.Worker(worker + [str(i)], processes.cpu_env(2), ROOT) for i in range(2)]
  # Meanwhile the API on 1 process x 4 devices: the same samples (DPS, started), and unguided.
  z, losses = model.condition([region], n=N, seed=SEED)
  z0, losses0 = model.condition([region], n=N, seed=SEED,
                                guide_start=model.config.diffusion.sample_steps)
  z1, losses1 = model.condition([region], n=N, seed=SEED, **started)
  images, unguided, fitted = (model.render(x, SIZE) for x in (z, z0, z1))
  processes.finish_all(workers, 600)

  assert z.shape == z1.shape == (N, *builders.latent_shape(model.config))
  # The jobs wrote the API's samples.
  np.testing.assert_array_equal(pixels.to_uint8(images), _written(tmp_path / "dps"))
  np.testing.assert_array_equal(pixels.to_uint8(fitted), _written(tmp_path / "started"))
  # Reference: RMSE over the known pixels in float64. Guidance (scale 10, 4 DDIM steps)
  # brings every sample to at most 90% of the same noise unguided, below 0.35 (measured
  # 0.329-0.333 against 0.377-0.382), and the returned losses are that RMSE (measured
  # within 5e-3: the renders here are clipped to [-1, 1]). Started from the whole image's
  # latent with data consistency, every sample is at most 90% of the unguided RMSE too
  # (measured 0.292-0.310, 76-82%).
  guided, plain = _masked_rmse(images, known, mask), _masked_rmse(unguided, known, mask)
  fit = _masked_rmse(fitted, known, mask)
  assert np.all(guided <= 0.9 * plain), (guided, plain)
  assert np.all(fit <= 0.9 * plain), (fit, plain)
  assert np.all(guided < 0.35), guided
  np.testing.assert_allclose(losses[:, 0], guided, atol=1e-2)
  np.testing.assert_allclose(losses0[:, 0], plain, atol=1e-2)
  np.testing.assert_allclose(losses1[:, 0], fit, atol=1e-2)


_LOW_RES = [{"kind": "low_res", "size": 32, "image": np.zeros((8, 8, 3), np.uint8)}]


@pytest.mark.parametrize("regions,settings,message", [
    ([{"kind": "blur", "size": 32, "image": "x.png"}], {}, r"regions\[0\]: condition kind 'blur'"),
    ([{"kind": "known", "size": 32, "box": [20, 20, 16, 16], "image": "x.png"}], {},
     r"regions\[0\]: box \(20, 20, 16, 16\) \(top, left, height, width\) is not inside the "
     "32x32 image"),
    ([{"kind": "low_res", "size": "32x48", "image": "missing.png"}], {},
     r"regions\[0\]: image missing.png not found"),
    ([{"kind": "text", "size": 32, "prompt": "a red square"}], {}, "clip_checkpoint"),
    ([{"kind": "low_res", "size": "3x", "image": "x.png"}], {}, r"regions\[0\].size='3x'"),
    ([{"kind": "known", "size": 32, "box": [0, 0, 8], "image": "x.png"}], {},
     r"regions\[0\]: box \[0, 0, 8\] must be 4 integers"),
    ([{"kind": "low_res", "image": "x.png"}], {}, r"regions\[0\]: needs kind and size"),
    ("[{", {}, "regions is not a JSON list"),
    ([{"kind": "low_res", "size": 32, "image": "x.png"}], {"guide_evry": 2},
     r"unknown settings \['guide_evry'\]"),
    (_LOW_RES, {"start": 0.5}, r"^condition.start=0.5: below 1 needs condition.init_image"),
    (_LOW_RES, {"start": 0.5, "init_image": "missing.png"},
     r"^condition.init_image='missing.png': not found"),
    (_LOW_RES, {"start": 1.5, "init_image": np.zeros((8, 8, 3), np.uint8)},
     r"^condition.start=1.5: must be a number in \(0, 1\]"),
    (_LOW_RES, {"fit_steps": -1}, r"^condition.fit_steps=-1: must be an integer >= 0"),
    (_LOW_RES, {"fit_steps": 2, "fit_lr": 0.0}, r"^condition.fit_lr=0.0: must be a number > 0"),
    (_LOW_RES, {"fit_zeta": 2.0}, r"^condition.fit_zeta=2.0: must be a number in \[0, 1\]"),
])
def test_bad_regions_and_settings_are_one_line_user_errors(model, regions, settings, message):
  with pytest.raises(checks.UserError, match=message) as e:
    model.condition(regions, n=2, **settings)
  assert "\n" not in str(e.value)
