"""User mistakes end in one line on stderr and exit code 2, never a traceback (subprocesses)."""

import os
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(module, *args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_error_line(out, prefix: str, *needles: str) -> str:
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith(prefix)]
  assert len(lines) == 1, out.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("sources")
  (root / "empty" / "sub").mkdir(parents=True)
  (root / "empty" / "notes.txt").write_text("no images here")
  bad = root / "bad"
  (bad / "sub").mkdir(parents=True)
  (bad / "broken.jpg").write_bytes(b"not a jpeg")
  Image.new("RGB", (40, 30)).save(bad / "sub" / "small.png")
  return root


@pytest.mark.parametrize("source,needles", [
    ("missing", ("not found",)),
    ("empty", ("holds no image files",)),
    ("bad", ("no usable image", "2 file(s) skipped", "broken.jpg", "small.png")),
])
def test_prepare_bad_sources(folders, tmp_path, source, needles):
  out = _run("infd_jax.data.prepare", "--dataset=image_folder", f"--source={folders / source}",
             f"--data_dir={tmp_path}", "--workers=1")
  _one_error_line(out, "infd-prepare: error:", *needles)
  if source == "bad":  # the per-file report comes with it, one SKIPPED line per file
    assert out.stderr.count("SKIPPED") == 2
  assert not (tmp_path / "image_folder" / "default").exists()  # nothing half-prepared


def test_training_on_an_all_bad_folder_shows_the_skip_report(folders, tmp_path):
  out = _run("infd_jax.main", "--config=configs/tiny.py", f"--workdir={tmp_path}",
             "--config.data.name=image_folder", "--config.data.variant=default",
             f"--config.data.source={folders / 'bad'}")
  _one_error_line(out, "infd_jax: error:", "no usable image")
  assert out.stderr.count("SKIPPED") == 2


@pytest.mark.parametrize("args,needles", [
    # Not prepared and no source: the suggested command carries its required flags.
    (("--config.data.name=image_folder", "--config.data.variant=default"),
     ("--config.data.source=FOLDER", "--dataset=image_folder --source=FOLDER --data_dir=")),
    (("--config.data.inp_res=33",), ("config.data.inp_res=33", "multiple of 2")),
    (("--config.data.patch=48",), ("patch <= gt_res_min", "patch=48")),
    (("--config.ae.renderer_hidden=48",), ("config.ae.renderer_hidden=48", "multiple of 32")),
    (("--config.train.ae_batch_size=0",), ("config.train.ae_batch_size=0",)),
])
def test_training_config_mistakes(tmp_path, args, needles):
  out = _run("infd_jax.main", "--config=tiny", f"--workdir={tmp_path}", *args)
  _one_error_line(out, "infd_jax: error:", *needles)


def test_bad_stage_is_the_only_output(tmp_path):
  out = _run("infd_jax.main", "--config=tiny", f"--workdir={tmp_path}", "--config.stage=train")
  _one_error_line(out, "infd_jax: error:", "config.stage='train'")
  assert out.stderr.strip().count("\n") == 0 and not out.stdout  # no config dump before it
