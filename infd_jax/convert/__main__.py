"""CLI: convert an official INFD checkpoint to the infd_jax format.

  infd-convert --input=last-model.pth --output=DIR [--parts=ae,dm_ema]
  (or python -m infd_jax.convert ...)

Writes DIR/params (orbax) and DIR/meta.json; see `infd_jax.convert.mapping`.
"""

import argparse
import json
import sys

from etils import epath

from infd_jax import paths
from infd_jax.convert import mapping
from infd_jax.convert.architecture import ConversionError
from infd_jax.convert.torch_pickle import CheckpointFormatError, UnsafeCheckpointError


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m infd_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--input", required=True, help="official .pth (e.g. last-model.pth)")
  parser.add_argument("--output", required=True, help="output directory (must not hold params/)")
  parser.add_argument("--parts", default="",
                      help=f"comma list of {','.join(mapping.PARTS)}; default: all present")
  args = parser.parse_args(argv)
  parts = [p for p in args.parts.split(",") if p] or None
  unknown = sorted(set(parts or ()) - set(mapping.PARTS))
  if unknown:
    parser.error(f"unknown parts {unknown}; choose from {mapping.PARTS}")
  if (epath.Path(args.output) / "params").exists():
    parser.error(f"{args.output}/params already exists; choose a fresh --output")
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


def cli() -> None:
  """The `infd-convert` console script."""
  sys.exit(main())


if __name__ == "__main__":
  cli()
