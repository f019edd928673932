"""Entry point: `infd --config=ffhq --workdir=W` (or `python -m infd_jax.main ...`).

`infd view PATH` starts the deep-zoom viewer instead (`infd_jax/view/cli.py`).

Kept thin on purpose: flags -> config checks -> logging, compilation cache and
(multi-host) init -> `jobs.run(config, workdir)`. `--config` is a file or a
packaged config name (`ffhq`, `configs/ffhq.py`, `custom:size=small`; see
`infd_jax.configs`). Config overrides use ml_collections syntax, e.g.
`--config.train.ae_batch_size=16` or `--config.stage=dm`; a misspelt key stops at
flag parsing with its name. Mistakes the user can fix end in one line on stderr
and exit code 2. Library INFO logs are hidden unless `--verbosity=1`.
"""

import importlib.util
import os
import re
import sys
import urllib.request
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from infd_jax import checks, configs, logs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: a file (my.py) or a packaged name "
    f"({', '.join(configs.names())}), optionally with :arg (custom:size=small).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("INFD_COORDINATOR_ADDRESS"),
    "host:port of process 0 for multi-process runs (env INFD_COORDINATOR_ADDRESS). "
    "Not needed on Cloud TPU or under SLURM, where JAX finds it itself.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("INFD_NUM_PROCESSES", "0")) or None,
    "Number of processes (env INFD_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ["INFD_PROCESS_ID"]) if "INFD_PROCESS_ID" in os.environ else None,
    "This process's index (env INFD_PROCESS_ID).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", None, "Call jax.distributed.initialize() with JAX's cluster auto-detection. "
    "Default: when a multi-process environment is detected (Cloud TPU slice with several "
    "hosts, SLURM or Open MPI job with several tasks); --nomultihost turns it off.")
flags.mark_flags_as_required(["config", "workdir"])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl parsing with one-line errors: a missing flag or a misspelt config key."""
  argv = configs.resolve_argv(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e).replace("\n", " ")
  except (KeyError, AttributeError, TypeError, ValueError) as e:  # from config overrides
    detail = re.sub(r"(\\n|\n)+", " ", str(e.args[0] if e.args else e)).replace("\\'", "'")
    message = f"bad config override: {detail}"
  print(f"infd_jax: error: {message} (see --helpfull)", file=sys.stderr)
  sys.exit(2)


def _error(message: str) -> NoReturn:
  print(f"infd_jax: error: {message}", file=sys.stderr)
  sys.exit(2)


def _tpu_vm_hosts() -> int:
  """Hosts of this Cloud TPU slice (0 when not on a TPU VM); asks the VM's metadata server."""
  hostnames = os.environ.get("TPU_WORKER_HOSTNAMES")  # GKE and queued resources set it
  if hostnames:
    return len(hostnames.split(","))
  if importlib.util.find_spec("libtpu") is None or os.environ.get("TPU_SKIP_MDS_QUERY"):
    return 0
  request = urllib.request.Request(
      "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
      "worker-network-endpoints", headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=2) as response:
      return len(response.read().decode().split(","))
  except OSError:
    return 0


def detected_cluster() -> str | None:
  """The multi-process environment jax.distributed.initialize() would join, or None."""
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS") or _tpu_vm_hosts() > 1:
    return "Cloud TPU slice"
  return None


def _init_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    # Explicit settings win over cluster auto-detection, which under SLURM would
    # otherwise pin each process to one GPU (SLURM_LOCALID).
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               cluster_detection_method="deactivate")
    return
  cluster = detected_cluster() if _MULTIHOST.value is None else None
  if _MULTIHOST.value or cluster:
    logging.info("multi-process start (%s)", cluster or "--multihost")
    jax.distributed.initialize()


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = _CONFIG.value
    _ = config.stage  # a missing or broken config file raises its loader's error here
  except Exception as e:  # pylint: disable=broad-except  (a broken or missing config file)
    reason = re.sub(r"\s+", " ", str(e))
    _error(f"cannot load --config={flags.FLAGS['config'].config_filename}: {reason}")
  try:
    checks.check_config(config)  # before any output (and jax), so a mistake is the only line
  except checks.UserError as e:
    _error(str(e))
  logs.configure(flags.FLAGS.verbosity)  # before jax loads: it also sets the C++ log level
  from infd_jax import compile_cache  # pylint: disable=g-import-not-at-top
  cache_dir = compile_cache.enable(config.compile_cache)
  if cache_dir:
    logging.info("compilation cache: %s (--config.compile_cache=off disables it)", cache_dir)
  _init_distributed()
  from infd_jax import jobs  # pylint: disable=g-import-not-at-top  (after distributed init)
  try:
    jobs.run(config, _WORKDIR.value,
             overrides=config_flags.get_override_values(flags.FLAGS["config"]).keys())
  except jobs.UserError as e:
    _error(str(e))


def run() -> None:
  """The `infd` console script; `infd view ...` is the deep-zoom viewer (`infd_jax.view`)."""
  if sys.argv[1:2] == ["view"]:
    from infd_jax.view import cli  # pylint: disable=g-import-not-at-top
    cli.run(sys.argv[2:])
    return
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
