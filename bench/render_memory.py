"""Peak host memory of streamed giant renders (pyramidal BigTIFF), per size.

  python -m bench.render_memory --sizes=8192,32768 --renderer=toy
  python -m bench.render_memory --sizes=8192 --renderer=tiny

Each size runs in a fresh process, which reports its peak resident memory
(ru_maxrss) and its resident memory before the render (after imports and the
model set-up), so the render's own share is the difference. `--renderer=tiny`
renders with the CLIF renderer of `configs/tiny.py` (random weights, hidden
32); `--renderer=toy` with a few arithmetic operations per pixel, to measure
the streaming machinery at sizes the network would take hours for on a CPU.
Prints one JSON line per size.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _child(size: int, renderer_name: str, tile: int, tiles_per_call: int, out: str,
           compression: str | None) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from infd_jax import builders, sharding  # pylint: disable=g-import-not-at-top
  from infd_jax.models import renderer as renderer_lib  # pylint: disable=g-import-not-at-top
  from infd_jax.rendering import stream, tiling  # pylint: disable=g-import-not-at-top
  from infd_jax.configs import tiny  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(-1, 1)
  if renderer_name == "tiny":
    ae = builders.autoencoder(tiny.get_config())
    phi = jnp.zeros((1, 32, 32, ae.ch * ae.ch_mult[0]))
    params = jax.jit(ae.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                              jnp.zeros((1, 16, 16, 2)), jnp.zeros((1, 16, 16, 2)))
    render_fn = tiling.module_render_fn(ae, "render")
  else:
    phi, params = jnp.zeros((1, 32, 32, 4)), {"scale": jnp.float32(0.5)}

    def render_fn(params, phi, coord, cell):
      x = renderer_lib.renderer_input(phi, coord, cell)[..., :3] * params["scale"]
      return x - x.mean(axis=(1, 2), keepdims=True)
  phi = jax.random.normal(jax.random.PRNGKey(1), phi.shape)
  phi = jax.device_put(phi, sharding.replicated(mesh))
  renderer = tiling.TiledRenderer(render_fn, tile, 8, tiles_per_call)
  write = lambda hw: stream.write_bigtiff(out, renderer, params, phi, hw, compression=compression)
  write((16 * tile, 16 * tile))  # compiles every call shape a larger power-of-two size uses
  before = _rss_mib()
  started = time.perf_counter()
  write((size, size))
  seconds = time.perf_counter() - started
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return dict(size=size, renderer=renderer_name, tile=tile, tiles_per_call=tiles_per_call,
              compression=compression,
              devices=jax.device_count(), device=jax.devices()[0].device_kind,
              rss_before_render_mib=round(before, 1), peak_rss_mib=round(peak, 1),
              render_share_mib=round(peak - before, 1), seconds=round(seconds, 1),
              tiles=stream.num_tiles((size, size), tile),
              file_mib=round(os.path.getsize(out) / 2**20, 1))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="8192,32768")
  p.add_argument("--renderer", choices=("toy", "tiny"), default="toy")
  p.add_argument("--tile", type=int, default=256)
  p.add_argument("--tiles_per_call", type=int, default=16)
  p.add_argument("--compression", default="none", choices=("none", "zlib"),
                 help="TIFF tile compression (zlib: smaller files, slower on few cores)")
  p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    compression = None if args.compression == "none" else args.compression
    print(json.dumps(_child(args.child, args.renderer, args.tile, args.tiles_per_call, args.out,
                            compression)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    for size in (int(s) for s in args.sizes.split(",")):
      out = os.path.join(tmp, f"{size}.tif")
      run = subprocess.run([sys.executable, "-m", "bench.render_memory", f"--child={size}",
                            f"--renderer={args.renderer}", f"--tile={args.tile}",
                            f"--tiles_per_call={args.tiles_per_call}", f"--out={out}",
                            f"--compression={args.compression}"],
                           capture_output=True, text=True, check=True)
      print(run.stdout.strip().splitlines()[-1], flush=True)
      os.remove(out)


if __name__ == "__main__":
  main()
