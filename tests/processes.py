"""Worker processes of the multi-process tests, with their output in files, not pipes.

A pipe that nobody drains blocks its writer once about 64 KiB wait in it: reading one
process's pipes until it exits while its peer fills its own (C++ logs of a failed
checkpoint read are long) deadlocks both at their next collective. Files never block.
"""

import json
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int) -> str:
  """The tests' XLA_FLAGS for `devices` simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={devices}"


def cpu_env(devices: int, *, optimize: bool = True) -> dict[str, str]:
  """A worker's environment: `devices` CPU devices, the tests' XLA flags, this session's
  compilation cache, the repository on the import path.

  `optimize=False` compiles at XLA's CPU optimisation level 0, for workers that run each
  program a few times, whose compiles then cost less than their runs lose (the inference
  test's three workers: 68.2 s -> 56.1 s). Level 0 rounds some float operations
  differently, so such a worker's output may only be compared with the output of workers at
  the same level.

  Of a multi-process run JAX lets only process 0 write the cache, and on CPU a program's key
  differs between processes (it hashes each process's topology): multi-process workers call
  `cache_compiles_of_every_process`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  flags = xla_flags(devices) + ("" if optimize else " --xla_backend_optimization_level=0")
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=flags,
              JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def cache_compiles_of_every_process() -> None:
  """Lets this worker write the compilation cache whatever its process index.

  JAX writes it from process 0 only. On CPU each process's programs have keys of their own
  (see `cpu_env`), so without this process 1 of a multi-process test never finds its
  programs in the cache and compiles them again in every launch; with it, it reads back what
  it compiled in an earlier launch of the same shape (processes x devices): 8.0 s user CPU
  -> 2.1 s for a second launch of `tests.sampler_multiprocess_worker` (2 x 2). Keys of
  different processes differ, so no two processes write one entry. Call after
  `jax.distributed.initialize`.
  """
  from jax._src import compiler, distributed  # pylint: disable=g-import-not-at-top
  write = compiler._cache_write  # pylint: disable=protected-access

  def write_as_process_0(*args, **kwargs):
    state = distributed.global_state
    process_id, state.process_id = state.process_id, 0
    try:
      write(*args, **kwargs)
    finally:
      state.process_id = process_id

  compiler._cache_write = write_as_process_0  # pylint: disable=protected-access


class Worker:
  """One started process; `finish` waits for it and returns what it wrote."""

  def __init__(self, args: list[str], env: dict[str, str], cwd: str):
    self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    self.proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=self._out, stderr=self._err,
                                 text=True)

  def finish(self, timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); the process is killed if it outlives `timeout`."""
    try:
      self.proc.wait(timeout=timeout)
    finally:
      self.proc.kill()
      self.proc.wait()
    texts = []
    for f in (self._out, self._err):
      f.seek(0)
      texts.append(f.read())
      f.close()
    return self.proc.returncode, texts[0], texts[1]


def finish_all(workers: list[Worker], timeout: float) -> list[tuple[str, str]]:
  """Waits for every worker; asserts each exited 0 (with its stderr's tail); (stdout, stderr)."""
  try:
    results = [w.finish(timeout) for w in workers]
  finally:
    for w in workers:  # the others too when one timed out
      w.proc.kill()
  assert all(code == 0 for code, _, _ in results), "\n".join(
      f"process {i}: exit {code}\n{err[-3000:]}" for i, (code, _, err) in enumerate(results))
  return [(out, err) for _, out, err in results]


def result(stdout: str) -> dict:
  """The JSON of a worker's last `RESULT {...}` line."""
  line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])
