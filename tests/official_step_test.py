"""One official training step of each stage against ours (tests/official_steps.py).

float64: our steps under JAX x64 with `train.compute_dtype=float64` (in a
subprocess, so x64 does not leak into this process) against the official steps
run in float64: every loss, the gradient of every parameter group and the
optimizer's update. The official gradients and updates are stored rounded to
float32, which bounds what can be checked at about 1e-7.
float32: our default path against the same official float64 step, within what
float32 allows: the official code's own float32-vs-float64 difference, stored
per group in the fixtures.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests import official_steps

ROOT = pathlib.Path(__file__).resolve().parent.parent
GROUPS = {"ae": ("encoder", "quantizer", "decoder", "renderer", "disc"), "dm": ("z_dm",)}


@pytest.fixture(scope="module")
def float64_errors(tmp_path_factory):
  out = tmp_path_factory.mktemp("x64") / "errors.json"
  env = dict(os.environ, JAX_ENABLE_X64="1", PYTHONPATH=str(ROOT))
  subprocess.run([sys.executable, str(ROOT / "tests" / "official_steps.py"), str(out)],
                 check=True, env=env, cwd=ROOT, timeout=900)
  return json.loads(out.read_text())


def _official_precision(stage: str) -> dict[str, float]:
  fx = np.load(official_steps.FIXTURES / f"{stage}_step.npz")
  return {k: float(fx[k]) for k in fx.files if k.startswith("f32_vs_f64")}


@pytest.mark.parametrize("stage", ["ae", "dm"])
def test_float64_step_matches_the_official_float64_step(float64_errors, stage):
  errors = float64_errors[stage]
  assert errors["dtype"] == "float64"  # optimizer state (and so parameters) in float64
  for key, value in errors.items():
    if key.startswith("loss/"):
      assert value < 2e-8, (key, value)
  for group in GROUPS[stage]:
    assert errors[f"grad/{group}"] < 5e-7, (group, errors[f"grad/{group}"])
    # Adam maps each gradient g to about sign(g) * lr unless |g| is near eps = 1e-8, so
    # near-zero gradients (analytically zero: biases before a one-channel-per-group
    # GroupNorm, attention key biases) decide the update; what is left is below 3e-4
    # (remaining float32 islands: our float32 coordinate grids, the official UNet's
    # float32 softmax), where a float32 softmax gave 1.7e-3.
    assert errors[f"update/{group}"] < 3e-4, (group, errors[f"update/{group}"])
  for key in [k for k in errors if k.startswith(("stats/", "ema/"))]:
    assert errors[key] < 1e-6, (key, errors[key])


@pytest.mark.parametrize("stage", ["ae", "dm"])
def test_float32_step_is_within_float32_of_the_official_step(stage):
  errors = official_steps.step_errors(stage, "float32")
  own = _official_precision(stage)
  assert errors["dtype"] == "float32"
  for key, value in errors.items():
    if key.startswith("loss/"):
      assert value < 1e-4, (key, value)
  for group in GROUPS[stage]:
    assert errors[f"grad/{group}"] < 5e-4, (group, errors[f"grad/{group}"])
    # As far from the official float64 update as the official float32 update is.
    assert errors[f"update/{group}"] < 3 * own[f"f32_vs_f64_update/{group}"] + 1e-6, group
