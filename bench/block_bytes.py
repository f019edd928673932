"""Bytes per image of one ResnetBlock's forward and backward pass on one chip, by batch.

  python -m bench.block_bytes --slice=v5e-8 --channels=128 --size=256 --batches=1,8

Compiles the gradient (parameters and input) of a squared loss on one residual block
(GroupNorm, swish, conv3x3, twice) of the autoencoder, at `--size` x `--size` with
`--channels` channels, for one chip of a TPU slice (libtpu on this host, as
`bench.roofline`), or for this host with `--slice=cpu`. Prints per image: GFLOP, XLA's
"bytes accessed" (every memory space) and the HBM-only bytes of `bench.hlo_bytes` (memory
space 0). This shows how the TPU compiler's plan for the same convolutions changes with the
number of images per chip, which the AE step's roofline (one image per chip on an 8-chip
slice) cannot show.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from bench import roofline
from infd_jax import aot
from infd_jax.models.blocks import ResnetBlock


def block_gradient(channels: int, size: int, batch: int, dtype: str, device: jax.Device):
  """The compiled gradient of mean(block(x)^2) / 2 in the block's parameters and x (the
  output's cotangent is the output itself, not a constant that XLA could fold)."""
  block = ResnetBlock(channels, dtype=jnp.dtype(dtype))
  shape = (batch, size, size, channels)
  sharding = SingleDeviceSharding(device)
  params = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros(shape, dtype)))
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        params)
  x = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
  loss = lambda p, x: jnp.mean(jnp.square(block.apply(p, x).astype(jnp.float32))) / 2
  return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()


def measure(channels: int, size: int, batch: int, dtype: str, device: jax.Device) -> dict:
  """Per-image GFLOP, XLA bytes and HBM-only bytes of the block's gradient."""
  compiled = block_gradient(channels, size, batch, dtype, device)
  cost = aot.analysis(compiled)
  hbm = roofline.hbm_bytes(compiled.as_text())
  return {"batch": batch, "dtype": dtype, "gflop": cost["flops"] / batch / 1e9,
          "xla_gb": cost["bytes_accessed"] / batch / 1e9, "hbm_gb": hbm / batch / 1e9}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.block_bytes", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--slice", choices=(*roofline.SLICES, "cpu"), default="v5e-8")
  parser.add_argument("--channels", type=int, default=128)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batches", default="1,8", help="comma list of images per chip")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  args = parser.parse_args(argv)
  topology = "cpu" if args.slice == "cpu" else roofline.SLICES[args.slice]
  device = aot.topology_devices(topology)[0]
  print(f"ResnetBlock({args.channels}) at {args.size} px, gradient, one {device.device_kind} "
        f"chip, per image:")
  print("| dtype | images per chip | GFLOP | XLA GB accessed | HBM GB | XLA / HBM |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  for dtype in args.dtypes.split(","):
    for batch in (int(b) for b in args.batches.split(",")):
      r = measure(args.channels, args.size, batch, dtype, device)
      print(f"| {dtype} | {batch} | {r['gflop']:.1f} | {r['xla_gb']:.3f} | {r['hbm_gb']:.3f} | "
            f"{r['xla_gb'] / r['hbm_gb']:.1f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
