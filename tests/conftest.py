"""Test setup: 8 simulated CPU devices and a persistent compilation cache.

The environment must be set before jax is imported anywhere.
"""

import fcntl
import os
import pathlib
import tempfile

from tests import processes

os.environ.setdefault("XLA_FLAGS", processes.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the environment is set)

_CACHE = os.environ.get("INFD_TEST_JAX_CACHE",
                        str(pathlib.Path(tempfile.gettempdir()) / "infd_jax_test_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402
from absl import flags  # noqa: E402

# The command line parses absl flags (grain's worker processes read them); pytest does not.
flags.FLAGS.mark_as_parsed()

# The files that launch several processes or train longest. pytest-xdist (the README's
# `-n 2 --dist loadfile --no-loadscope-reorder`) hands whole files to its workers in
# collection order, so these go first and alternate between the workers, and the run does not
# end on one of them alone. (Without the last flag xdist orders files by their test count.)
LONGEST_FILES = ("pod_test.py", "jobs_test.py", "condition_test.py", "inference_test.py",
                 "train_step_test.py", "t2i_test.py", "openmoji_bench_test.py", "demo_test.py",
                 "guidance_test.py", "compile_cache_test.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Puts the tests of LONGEST_FILES first, in that order; a stable sort keeps every file's
  own order and the other files' order."""
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory, worker_id) -> pathlib.Path:
  """A folder of this test run that its pytest-xdist workers share (without xdist, this
  process's temporary folder)."""
  base = tmp_path_factory.getbasetemp()
  return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def tiny_data(run_folder):
  """The folder of the demo dataset that `tiny_trained` is prepared into and trained on."""
  folder = run_folder / "tiny_data"
  folder.mkdir(exist_ok=True)
  return folder


@pytest.fixture(scope="session")
def tiny_config(tiny_data):
  """Makes the config `tiny_trained` was trained with: `tiny_config(stage, **train)`.

  z_channels, codebook size, UNet channel multipliers and head width differ from
  `configs/tiny.py`, so later stages only work if they read the saved architecture.
  Both stages evaluate once, at step 3, on one batch of the training split (the demo set
  has one split; it stands in for validation).
  """
  from configs import tiny  # pylint: disable=g-import-not-at-top

  def make(stage: str, **train):
    c = tiny.get_config()
    c.stage = stage
    c.data.update(data_dir=str(tiny_data), eval_split="train")
    c.ae.update(z_channels=4, num_codes=16)
    c.dm.update(channel_mult=(1, 1), num_head_channels=16)
    c.train.update(eval_every=3, eval_batches=1, **train)
    return c
  return make


def _listing(folder: pathlib.Path) -> list[tuple[str, int, int]]:
  """(relative path, size, modification time) of every file under `folder`."""
  return sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                for f in folder.rglob("*") if f.is_file())


@pytest.fixture(scope="session")
def tiny_trained(tiny_config, run_folder):
  """A workdir with a 3-step autoencoder and diffusion model trained by `tiny_config`
  (checkpoints at steps 2 and 3). Tests that write into it work on a copy.

  Trained once per test run: the first pytest-xdist worker to need it trains it under a
  lock, the others wait and read it. A test that changed it would fail at the end.
  """
  from infd_jax import jobs  # pylint: disable=g-import-not-at-top
  work, done = run_folder / "tiny_trained", run_folder / "tiny_trained.done"
  with open(run_folder / "tiny_trained.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      for stage in ("ae", "dm"):
        jobs.run(tiny_config(stage), work)
      done.touch()
  before = _listing(work)
  yield work
  assert _listing(work) == before, f"a test wrote into {work}; tests must write into a copy"


@pytest.fixture(scope="session")
def view_server(tiny_trained, tmp_path_factory):
  """The viewer serving the tiny model's samples on 127.0.0.1, shared by the viewer tests.

  DZI tiles of 128 px (overlap 1), two cached feature maps and a 4 MB tile cache,
  so that the caches' bounds are reached within a test.
  """
  import infd_jax  # pylint: disable=g-import-not-at-top
  from infd_jax.view import batching, caches, model_source, server, tiles  # pylint: disable=g-import-not-at-top
  from tests import view_support  # pylint: disable=g-import-not-at-top
  model = infd_jax.load(tiny_trained)
  source = model_source.ModelSource(model, phi_cache=2)
  service = tiles.TileService(
      source, caches.DiskCache(tmp_path_factory.mktemp("view_cache"), 4 << 20),
      batching.Batcher(source.render), tile_size=128, overlap=1, max_export=512)
  with view_support.ServerThread(server.make_app(service, {"size": 1024, "seed": 0})) as running:
    running.model, running.service = model, service
    yield running


@pytest.fixture(scope="session")
def svgs(tmp_path_factory):
  """A folder of 12 SVGs of the installed OpenMoji package: 4 held-out and 8 training emoji."""
  import shutil  # pylint: disable=g-import-not-at-top
  from infd_jax.data import openmoji  # pylint: disable=g-import-not-at-top
  package = openmoji.svg_dir()
  train, val = openmoji.split_names(openmoji.list_names(package))
  folder = tmp_path_factory.mktemp("svgs")
  for name in val[:4] + train[:8]:
    shutil.copy(os.path.join(package, f"{name}.svg"), folder / f"{name}.svg")
  return folder
