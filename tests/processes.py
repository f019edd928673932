"""Worker processes of the multi-process tests, with their output in files, not pipes.

A pipe that nobody drains blocks its writer once about 64 KiB wait in it: reading one
process's pipes until it exits while its peer fills its own (C++ logs of a failed
checkpoint read are long) deadlocks both at their next collective. Files never block.
"""

import json
import subprocess
import tempfile


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
