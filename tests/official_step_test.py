"""One official training step of each stage against ours (tests/official_steps.py).

float64: our steps under JAX x64 with `train.compute_dtype=float64` against the
official steps run in float64 throughout (make_fixtures.py lifts the official
code's float32 casts): every loss, the gradient of every parameter group, the
optimizer's update, BatchNorm statistics and EMA. The official gradients are stored
rounded to float32, which bounds the gradient comparison at about 3e-8; losses agree
to float64 rounding and the updates (Adam maps g to about sign(g) * lr) far below.
Our float64 steps run in a subprocess started when this module starts, so x64 does
not leak into the test process and its compilations overlap the float32 tests.

float32: our default path against the same official float64 step, within what
float32 allows. Stage 2 is smooth: within a few times the official code's own
float32-vs-float64 difference (stored per group). Stage 1 has kinks (LPIPS ReLUs,
discriminator LeakyReLUs): float32 rounding moves some ReLU inputs near 0 across 0
in either code, each a jump of the gradient (1.6e-4 for one first-layer LPIPS ReLU,
6e-3 for one discriminator LeakyReLU in the official float32 run of these
fixtures), so there only the losses are held to float32 rounding.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import official_steps

ROOT = pathlib.Path(__file__).resolve().parent.parent
GROUPS = {"ae": ("encoder", "quantizer", "decoder", "renderer", "disc"), "dm": ("z_dm",)}
# Stage-1 quantities computed from gradients (the adaptive GAN weight is a ratio of
# last-layer gradient norms), which a float32 kink crossing moves.
KINKED_LOSSES = ("loss/adaptive_g_w", "loss/loss")


@pytest.fixture(scope="module", autouse=True)
def float64_run(tmp_path_factory):
  """`official_steps.py` in an x64 subprocess, started before this module's first test.

  Its compilations (XLA at backend optimisation level 0: float64 results change by
  rounding only, compiles take about half the time) share the test cache directory.
  """
  out = tmp_path_factory.mktemp("x64") / "errors.json"
  env = dict(os.environ, JAX_ENABLE_X64="1", PYTHONPATH=str(ROOT),
             XLA_FLAGS="--xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "official_steps.py"), str(out)],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  yield proc, out
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def float64_errors(float64_run):
  proc, out = float64_run
  log, _ = proc.communicate(timeout=900)
  assert proc.returncode == 0, log[-3000:]
  return json.loads(out.read_text())


def _official_precision(stage: str) -> dict[str, float]:
  fx = np.load(official_steps.FIXTURES / f"{stage}_step.npz")
  return {k: float(fx[k]) for k in fx.files if k.startswith("f32_vs_f64")}


@pytest.mark.parametrize("stage", ["ae", "dm"])
def test_float32_step_is_within_float32_of_the_official_step(stage):
  errors = official_steps.step_errors(stage, "float32")
  own = _official_precision(stage)
  assert errors["dtype"] == "float32"
  for key, value in errors.items():
    if key.startswith("loss/"):
      # Continuous in the inputs: float32 rounding (the official's own: up to 2.6e-6).
      bound = 2e-4 if key in KINKED_LOSSES else 2e-5
      assert value < bound, (key, value, own[f"f32_vs_f64_{key}"])
  for group in GROUPS[stage]:
    grad, update = errors[f"grad/{group}"], errors[f"update/{group}"]
    if stage == "dm":
      assert grad < 5 * own[f"f32_vs_f64_grad/{group}"], (group, grad)
    else:  # kinks: see the module docstring
      assert grad < 2e-2, (group, grad)
    # Adam turns the rounding noise of zero gradients (biases before a GroupNorm of one
    # channel per group, attention key biases) into updates of +-lr, in both codes.
    assert update < 3 * own[f"f32_vs_f64_update/{group}"] + 1e-6, (group, update)


@pytest.mark.parametrize("stage", ["ae", "dm"])
def test_float64_step_matches_the_official_float64_step(float64_errors, stage):
  errors = float64_errors[stage]
  assert errors["dtype"] == "float64"  # optimizer state (and so parameters) in float64
  for key, value in errors.items():
    if key.startswith(("loss/", "stats/")):
      bound = 1e-6 if key == "loss/psnr" else 1e-12  # PSNR: a float32 metric (metrics.psnr)
      assert value < bound, (key, value)
  for group in GROUPS[stage]:
    assert errors[f"grad/{group}"] < 1e-7, (group, errors[f"grad/{group}"])
    assert errors[f"update/{group}"] < 1e-8, (group, errors[f"update/{group}"])
  for key in [k for k in errors if k.startswith("ema/")]:
    assert errors[key] < 1e-8, (key, errors[key])
