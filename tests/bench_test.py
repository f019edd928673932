"""The benchmarks run from the repository root as documented (`python -m bench.<name>`)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


@pytest.mark.parametrize("name", ["data_pipeline", "prepare_speed", "render_memory",
                                  "sampler_quality", "t2i_adherence", "view_load"])
def test_data_benchmarks_start(name):
  assert "usage:" in _run(f"bench.{name}", "--help")


def test_model_speed_plans_a_tiny_train_step():
  out = json.loads(_run("bench.model_speed", "--what=dm", "--config=configs/tiny.py",
                        "--batch=8", "--plan_only").strip().splitlines()[-1])
  assert out["batch"] == 8 and out["devices"] == 8 and out["flops"] > 0 and out["plan_temp_bytes"] > 0
