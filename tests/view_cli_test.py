"""`infd view` / `python -m infd_jax.view`: a bad setting is one line and exit code 2."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _view(*args, module="infd_jax.view"):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("args,named", [
    (["--size=0"], "--size=0"),
    (["--size=2000000"], "--size=2000000"),
    (["--max_size=4194304"], "--max_size=4194304"),
    (["--tile_size=8"], "--tile_size=8"),
    (["--overlap=100"], "--overlap=100"),
    (["--port=70000"], "--port=70000"),
    (["--seed=-1"], "--seed=-1"),
    (["--size=big"], "--size"),
    (["--bogus=1"], "--bogus"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, args, named):
  out = _view(str(tmp_path), *args)
  assert out.returncode == 2 and out.stdout == "", out
  assert len(out.stderr.strip().splitlines()) == 1 and named in out.stderr, out.stderr


def test_a_missing_path_and_a_taken_port_are_named(tmp_path):
  out = _view(str(tmp_path / "nowhere"))
  assert out.returncode == 2 and "nowhere: no such file or folder" in out.stderr, out
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    out = _view(str(tmp_path), f"--port={port}")
  assert out.returncode == 2 and f"--port={port}: cannot listen there" in out.stderr, out
  assert len(out.stderr.strip().splitlines()) == 1


def test_a_folder_with_neither_model_nor_images_is_one_line(tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  out = _view(str(tmp_path), "--port=0", "--compile_cache=off")
  assert out.returncode == 2, out
  assert "neither a workdir" in out.stderr and "holds no PNG" in out.stderr, out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_infd_view_is_a_subcommand_of_infd():
  out = _view("view", "--help", module="infd_jax.main")
  assert out.returncode == 0 and "usage: infd view" in out.stdout and "--tile_size" in out.stdout
