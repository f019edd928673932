"""absl flags for the smaller command-line tools, so every tool parses flags the same way.

`infd` and `python -m infd_jax.aot` run under `absl.app`; the one-shot tools
(`infd-prepare`, `infd-convert`, the FID tools) call `parse`, which defines their
flags on a fresh `FlagValues` (nothing global, so they can be called in-process)
and reports a bad flag in one line with exit code 2.
"""

import sys
from typing import Callable, Sequence

from absl import flags


def parse(prog: str, doc: str, define: Callable[[flags.FlagValues], None],
          argv: Sequence[str] | None = None) -> flags.FlagValues:
  """The parsed flags of one tool.

  Args:
    prog: the tool's name, e.g. "infd-prepare" (it starts error lines).
    doc: the help text shown above the flags for --help.
    define: defines the tool's flags on the FlagValues it is given.
    argv: the arguments (default sys.argv[1:]).

  Returns:
    The FlagValues, with `.name` giving each flag's value.
  """
  values = flags.FlagValues()
  define(values)
  argv = list(sys.argv[1:] if argv is None else argv)
  if {"--help", "-h", "--helpfull"} & set(argv):
    print(f"{doc.rstrip()}\n\nflags:\n{values.get_help()}")
    sys.exit(0)
  try:
    extra = values([prog, *argv])[1:]
  except flags.Error as e:
    _fail(prog, str(e))
  if extra:
    _fail(prog, f"unexpected arguments {' '.join(extra)}")
  return values


def _fail(prog: str, message: str) -> None:
  print(f"{prog}: error: {' '.join(message.split())} (see --help)", file=sys.stderr)
  sys.exit(2)
