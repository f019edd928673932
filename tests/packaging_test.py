"""The package installs into a fresh venv and its console scripts run from any folder."""

import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins(lines) -> dict[str, str]:
  out = {}
  for line in lines:
    line = line.split("#")[0].strip()
    if line:
      name, _, version = line.partition("==")
      out[re.sub(r"[-_.]+", "-", name.lower())] = version
  return out


def test_package_dependencies_are_the_pinned_requirements():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  runtime = _pins(project["dependencies"])
  pinned = _pins((ROOT / "requirements.txt").read_text().splitlines())
  extra = _pins(project["optional-dependencies"]["test"])
  assert {k: pinned.get(k) for k in runtime} == runtime
  assert set(runtime) | set(extra) | {"setuptools"} == set(pinned)


def test_installed_console_scripts_run_from_another_folder(tmp_path):
  """`pip install .` (no network: dependencies come from this interpreter's site-packages
  through a .pth file) gives `infd` (and `infd view` with its page), `infd-prepare` and
  `infd-convert`, and `--config=demo` finds the packaged config outside the repository."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  shutil.copytree(ROOT / "infd_jax", src / "infd_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  py = venv / "bin" / "python"
  purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           check=True, capture_output=True, text=True).stdout.strip()
  outer = [p for p in sys.path if p.endswith("site-packages")]  # incl. ones a .pth added
  pathlib.Path(purelib, "outer.pth").write_text("\n".join(outer) + "\n")
  subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                  "--no-deps", "--no-build-isolation", str(src)], check=True, cwd=tmp_path)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()

  def run(script, *args):
    return subprocess.run([venv / "bin" / script, *args], cwd=elsewhere, capture_output=True,
                          text=True, timeout=120)

  out = run("infd", "--helpfull")
  assert "--config" in out.stdout and "--workdir" in out.stdout, out.stderr[-2000:]
  out = run("infd", "--config=demo", "--workdir=w", "--config.stage=bogus")
  assert out.returncode == 2 and "config.stage='bogus'" in out.stderr, out.stderr[-2000:]
  for script in ("infd-prepare", "infd-convert"):
    out = run(script, "--help")
    assert out.returncode == 0 and ("--data_dir" in out.stdout or "--input" in out.stdout), out
  imported = subprocess.run([py, "-c", "import infd_jax.configs as c; print(c.__file__)"],
                            cwd=elsewhere, capture_output=True, text=True, check=True).stdout
  assert str(venv) in imported  # the installed copy, not the repository
  out = run("infd", "view", "--help")
  assert out.returncode == 0 and "--tile_size" in out.stdout, out.stderr[-2000:]
  static = subprocess.run([py, "-c", "import infd_jax.view.server as s; print(s.STATIC)"],
                          cwd=elsewhere, capture_output=True, text=True, check=True).stdout.strip()
  assert str(venv) in static
  for name in ("index.html", "viewer.js", "viewer.css", "openseadragon/openseadragon.min.js",
               "openseadragon/LICENSE.txt", "openseadragon/images/zoomin_rest.png"):
    assert pathlib.Path(static, name).is_file(), name  # the viewer's page ships as package data
