"""Runs the `infd` command line once per case, each in a forked child, and reports what happened.

Usage: python -m tests.config_errors_driver CASES.json RESULTS.json
CASES.json: [{"argv": [...], "watch": [folders], "with_jax": bool}, ...]. The parent
imports the command line (absl, ml_collections, the config checks, the data
registry; not jax) once, then forks one child per case. A child records every file
opened or folder listed under `watch` (a Python audit hook), and for `with_jax`
cases imports jax first and records every compilation event; it reports the exit
code, its stderr, whether jax was imported, and those records.
"""

import json
import os
import sys
import tempfile

from infd_jax import main as cli
from infd_jax.data import prepare  # noqa: F401  (no jax: imported once, before the forks)

_READS = ("open", "os.listdir", "os.scandir")


def _child(case: dict, report: str) -> None:
  watch = tuple(case["watch"])
  opened, compiles = [], []

  def audit(event, args):
    if event in _READS and args and isinstance(args[0], (str, bytes, os.PathLike)):
      path = os.fsdecode(args[0]) if not isinstance(args[0], int) else ""
      if path and os.path.abspath(path).startswith(watch):
        opened.append(path)
  sys.addaudithook(audit)
  if case["with_jax"]:
    import jax  # pylint: disable=g-import-not-at-top
    listen = lambda name, *args, **kwargs: compiles.append(name) if "compil" in name else None
    jax.monitoring.register_event_listener(listen)
    jax.monitoring.register_event_duration_secs_listener(listen)
  code = 0
  try:
    argv = ["infd", *case["argv"]]
    given = cli.define_flags(argv=argv)
    cli.main(given, cli._parse_flags(argv))  # pylint: disable=protected-access
  except SystemExit as e:
    code = e.code
  except BaseException as e:  # pylint: disable=broad-except
    code = f"raised {e!r}"
  with open(report, "w") as f:
    json.dump({"code": code, "jax": "jax" in sys.modules, "opened": opened,
               "compiles": compiles}, f)


def main(argv: list[str]) -> None:
  cases = json.loads(open(argv[1]).read())
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, case in enumerate(cases):
      report, err = os.path.join(tmp, f"{i}.json"), os.path.join(tmp, f"{i}.err")
      pid = os.fork()
      if pid == 0:
        fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        try:
          _child(case, report)
        finally:
          os._exit(0)  # pylint: disable=protected-access
      os.waitpid(pid, 0)
      result = json.loads(open(report).read()) if os.path.exists(report) else {"code": "died"}
      result["stderr"] = open(err).read()
      results.append(result)
  with open(argv[2], "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main(sys.argv)
