"""CLI: convert an official INFD checkpoint to the infd_jax format.

  infd-convert --input=last-model.pth --output=DIR [--parts=ae,dm_ema]
  (or python -m infd_jax.convert ...)

Writes DIR/params (orbax) and DIR/meta.json; see `infd_jax.convert.mapping`.
"""

import json
import sys

from absl import flags
from etils import epath

from infd_jax import cli_flags, paths
from infd_jax.convert import mapping
from infd_jax.convert.architecture import ConversionError
from infd_jax.convert.torch_pickle import CheckpointFormatError, UnsafeCheckpointError


def _define(values: flags.FlagValues) -> None:
  flags.DEFINE_string("input", None, "official .pth (e.g. last-model.pth)", flag_values=values)
  flags.DEFINE_string("output", None, "output directory (must not hold params/)",
                      flag_values=values)
  flags.DEFINE_list("parts", [], f"comma list of {','.join(mapping.PARTS)}; default: all present",
                    flag_values=values)
  flags.mark_flags_as_required(["input", "output"], flag_values=values)


def main(argv: list[str] | None = None) -> int:
  args = cli_flags.parse("infd-convert", __doc__, _define, argv)
  parts = list(args.parts) or None
  unknown = sorted(set(parts or ()) - set(mapping.PARTS))
  if unknown:
    _usage_error(f"unknown parts {unknown}; choose from {mapping.PARTS}")
  if (epath.Path(args.output) / "params").exists():
    _usage_error(f"{args.output}/params already exists; choose a fresh --output")
  try:
    meta = mapping.convert_checkpoint(args.input, args.output, parts)
  except (ConversionError, CheckpointFormatError, UnsafeCheckpointError) as e:
    print(f"conversion failed: {e}", file=sys.stderr)
    return 1
  print(f"model {meta['model_name']!r}, iteration {meta['iter']}; official args:")
  print(json.dumps(meta["model_args"], indent=2, default=str))
  for family in ("ae", "disc", "dm"):
    if family in meta:
      print(f"found {family}: {meta[family]}")
  for part, n in meta["param_counts"].items():
    print(f"  {part:7s} {n:>13,d} values")
  print(f"wrote {paths.absolute(args.output)}")
  return 0


def _usage_error(message: str) -> None:
  print(f"infd-convert: error: {message}", file=sys.stderr)
  sys.exit(2)


def cli() -> None:
  """The `infd-convert` console script."""
  sys.exit(main())


if __name__ == "__main__":
  cli()
