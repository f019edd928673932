"""Rooflines of the hot paths from TPU ahead-of-time plans (libtpu on a CPU host).

  python -m bench.roofline compile --program=ae_step --slice=v5e-8 --dtype=bfloat16
  python -m bench.roofline lower --program=ae_step --slice=v5e-8   # the program's sha256 only
  python -m bench.roofline table

`compile` builds one hot path of a config (`--config`, default the official FFHQ
one at its batches), compiles it for a slice with libtpu (`infd_jax.aot`) and
appends XLA's per-chip memory plan and cost analysis to `--results`, with the
sha256 of the lowered program (StableHLO text): a program already there for the
slice is not compiled again, so a sweep restarts where it stopped, and a code
change that leaves a program's text unchanged is proven not to change its plan.
It also records the plan's HBM-only bytes (`bench.hlo_bytes`: operands and
results in memory space 0; XLA's "bytes accessed" also counts the on-chip VMEM
staging of every convolution). `table` prints, per chip, FLOPs, both byte
counts, the memory plan and the lower bounds on the time of one call, FLOPs /
peak and bytes / HBM bandwidth, from the chips' published figures.

Programs (global batches, sharded over the chips):
  ae_step      one stage-1 iteration (generator and discriminator), train.ae_batch_size
  dm_step      one stage-2 iteration, train.dm_batch_size cached latents
  ddim_step    one DDIM step (a UNet call and the update) of sample.batch_size latents
  render_call  one renderer call: one padded tile (sample.tile + 2 sample.pad) of each of
               sample.batch_size feature maps

XLA's cost analysis counts a loop body once: the attention and quantizer scans
inside the steps are under-counted (see `infd_jax.aot`); nothing else loops.
"""

import argparse
import dataclasses
import hashlib
import json
import pathlib
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bench import hlo_bytes
from infd_jax import aot, builders, checks, config_files, sharding
from infd_jax.diffusion import samplers
from infd_jax.training import ae_task, dm_task, loop

PROGRAMS = ("ae_step", "dm_step", "ddim_step", "render_call")
DTYPES = ("float32", "bfloat16")
RESULTS = "bench/results/roofline_tpu.jsonl"


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures of a TPU generation."""
  bf16_tflops: float  # peak dense bfloat16 compute, 1e12 FLOP/s
  hbm_gbps: float     # HBM bandwidth, 1e9 bytes/s
  source: str


CHIPS = {
    "v5e": Chip(197, 819, "https://cloud.google.com/tpu/docs/v5e"),
    "v6e": Chip(918, 1638, "https://cloud.google.com/tpu/docs/v6e"),
    "v5p": Chip(459, 2765, "https://cloud.google.com/tpu/docs/v5p"),
}
# Slice name -> aot topology; v5p names count TensorCores, so a v5p-8 has 4 chips.
SLICES = {"v5e-8": "v5e:2x4", "v6e-8": "v6e:2x4", "v5p-8": "v5p:2x2x1"}


def _abstract_state(init_fn, mesh, config) -> Any:
  state, _, _ = loop.initial_state(init_fn, mesh, sharding.config_rules(config.mesh), 0)
  return state


def ddim_step_program(config, mesh) -> tuple[aot.Program, int]:
  """One DDIM step (t = 999) of `sample.batch_size` latents, batch-sharded."""
  batch = config.sample.batch_size
  dm_params = _abstract_state(dm_task.init_fn(config), mesh, config).params
  unet, batch_sharding = builders.unet(config), sharding.batch_sharding(mesh)
  shape = (batch, *builders.latent_shape(config))

  def step(params, key):
    return samplers.ddim_sample(builders.eps_model(config, unet), params, key, shape,
                                builders.diffusion_schedule(config), num_steps=1,
                                eta=config.diffusion.eta, batch_sharding=batch_sharding)

  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
  fn = jax.jit(step, out_shardings=batch_sharding)
  return aot.Program("ddim_step", fn, (dm_params, key)), batch


def render_call_program(config, mesh) -> tuple[aot.Program, int]:
  """One renderer call on a padded tile of each of `sample.batch_size` feature maps."""
  batch, side = config.sample.batch_size, config.sample.tile + 2 * config.sample.pad
  ae = builders.autoencoder(config)
  ae_params = _abstract_state(ae_task.init_fn(config), mesh, config).gen_params
  spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32,
                                            sharding=sharding.batch_sharding(mesh))
  phi = jax.eval_shape(lambda p, z: ae.apply({"params": p}, z, method="decode"), ae_params,
                       _latents(config, batch, mesh))
  fn = jax.jit(lambda p, phi, coord, cell: ae.apply({"params": p}, phi, coord, cell,
                                                    method="render"),
               out_shardings=sharding.batch_sharding(mesh))
  grid = (batch, side, side, 2)
  return aot.Program("render_call", fn, (ae_params, spec(phi.shape), spec(grid), spec(grid))), batch


def _latents(config, batch: int, mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((batch, *builders.latent_shape(config)), jnp.float32,
                              sharding=sharding.batch_sharding(mesh))


def build(config, program: str, mesh) -> tuple[aot.Program, int]:
  """The program and its global batch (images or latents per call)."""
  if program in ("ae_step", "dm_step"):
    stage = program[:2]
    batch = aot.default_batch(config, stage)
    aot.check_batch(batch, mesh)
    return aot.train_program(config, stage, batch, mesh)[0], batch
  if program == "ddim_step":
    return ddim_step_program(config, mesh)
  return render_call_program(config, mesh)


def lowered_sha(lowered) -> str:
  """sha256 of the lowered program's text (no source locations), the plan's only input."""
  return hashlib.sha256(lowered.as_text().encode()).hexdigest()


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def _records(path: pathlib.Path) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def aot_records(path: pathlib.Path) -> list[dict[str, Any]]:
  """`infd_jax.aot` records (its sweep file) of this table's slices, as rows labelled "aot"
  (no lowered sha256 or HBM-only bytes: that tool records neither)."""
  slices = {topology: name for name, topology in SLICES.items()}
  # Its "hbm_bytes" is the chip's HBM capacity, not traffic.
  return [r | {"slice": slices[r["topology"]], "dtype": r["compute_dtype"], "label": "aot",
               "hbm_bytes": None}
          for r in _records(path)
          if r["topology"] in slices and r["program"] in PROGRAMS and r.get("flops")]


def _config(args) -> ml_collections.ConfigDict:
  config = config_files.load(args.config)
  config.train.compute_dtype = args.dtype
  for item in args.set:
    key, _, value = item.partition("=")
    section, _, name = key.rpartition(".")
    node = config[section] if section else config
    node[name] = type(node[name])(json.loads(value))
  return config


def compile_one(args) -> dict[str, Any] | None:
  """Lowers `args.program` for `args.slice`; compiles and appends it unless already there."""
  topology = SLICES[args.slice]
  config = _config(args)
  devices = aot.topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  program, batch = build(config, args.program, mesh)
  start = time.process_time()
  lowered = program.fn.lower(*program.args)
  sha = lowered_sha(lowered)
  print(f"{args.program} {args.slice} {args.dtype}: lowered in "
        f"{time.process_time() - start:.1f} s CPU, sha256 {sha[:16]}", flush=True)
  if args.command == "lower":
    return None
  results = pathlib.Path(args.results)
  for r in _records(results):
    if r["lowered_sha256"] == sha and r["slice"] == args.slice:
      print(f"  the same program is in {results} (label {r['label']!r}): not compiled", flush=True)
      return r
  wall, cpu = time.perf_counter(), time.process_time()
  compiled = lowered.compile()
  hlo = compiled.as_text()
  if args.hlo_out:
    pathlib.Path(args.hlo_out).write_text(hlo)
  record = {"program": args.program, "slice": args.slice, "topology": topology,
            "chips": len(devices), "device_kind": devices[0].device_kind, "dtype": args.dtype,
            "batch": batch, "config": args.config, "set": args.set, "label": args.label,
            "commit": _commit(), "lowered_sha256": sha,
            "compile_wall_s": round(time.perf_counter() - wall, 1),
            "compile_cpu_s": round(time.process_time() - cpu, 1),
            "date": time.strftime("%Y-%m-%d"), **aot.analysis(compiled),
            "hbm_bytes": hbm_bytes(hlo)}
  results.parent.mkdir(parents=True, exist_ok=True)
  with results.open("a") as f:
    f.write(json.dumps(record) + "\n")
  print(f"  {record['flops'] / 1e9:,.0f} GFLOP, {record['bytes_accessed'] / 1e9:,.1f} GB accessed, "
        f"total {record['total_bytes'] / 2 ** 30:.2f} GiB per chip; compiled in "
        f"{record['compile_cpu_s']:.0f} s CPU ({record['compile_wall_s']:.0f} s wall)", flush=True)
  return record


def hbm_bytes(hlo: str) -> int:
  """Operand and result bytes in HBM (memory space 0) of a plan's ops (`bench.hlo_bytes`)."""
  return sum(op.hbm_bytes for op in hlo_bytes.parse(hlo))


def bounds(record: dict[str, Any]) -> dict[str, float]:
  """Per-chip lower bounds (seconds) of one call and the items per second they allow: FLOPs /
  peak, XLA's bytes accessed / HBM bandwidth and (where recorded) HBM-only bytes / bandwidth."""
  chip = CHIPS[record["slice"].split("-")[0]]
  t_flops = record["flops"] / (chip.bf16_tflops * 1e12)
  t_bytes = record["bytes_accessed"] / (chip.hbm_gbps * 1e9)
  hbm = record.get("hbm_bytes")
  t_hbm = hbm / (chip.hbm_gbps * 1e9) if hbm is not None else None
  per_chip = record["batch"] / record["chips"]
  return {"t_flops": t_flops, "t_bytes": t_bytes, "t_hbm": t_hbm, "per_chip": per_chip,
          "items_per_s": per_chip / max(t_flops, t_bytes)}


def table(records: list[dict[str, Any]], labels: set[str] | None = None) -> str:
  """Markdown rows (newest record per program, slice, dtype and label)."""
  latest: dict[tuple, dict[str, Any]] = {}
  for r in records:
    if labels is None or r["label"] in labels:
      latest[(r["program"], r["slice"], r["dtype"], r["label"])] = r
  gib = lambda b: f"{b / 2 ** 30:.2f}"
  lines = ["| program | slice | dtype | label | per chip | GFLOP | GB accessed | HBM GB | "
           "arguments / outputs / temporaries / total GiB | FLOPs / peak ms | bytes / HBM ms | "
           "HBM-only ms | bound | items/s per chip (bound) |",
           "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- "
           "| ---: |"]
  order = lambda k: (PROGRAMS.index(k[0]), list(SLICES).index(k[1]), DTYPES.index(k[2]), k[3])
  for key in sorted(latest, key=order):
    r = latest[key]
    b = bounds(r)
    plan = " / ".join(gib(r[k]) for k in ("argument_bytes", "output_bytes", "temp_bytes",
                                          "total_bytes"))
    hbm = "" if b["t_hbm"] is None else f"{r['hbm_bytes'] / 1e9:,.1f}"
    t_hbm = "" if b["t_hbm"] is None else f"{b['t_hbm'] * 1e3:.2f}"
    lines.append(
        f"| {r['program']} | {r['slice']} | {r['dtype']} | {r['label']} | {b['per_chip']:g} | "
        f"{r['flops'] / 1e9:,.0f} | {r['bytes_accessed'] / 1e9:,.1f} | {hbm} | {plan} | "
        f"{b['t_flops'] * 1e3:.2f} | {b['t_bytes'] * 1e3:.2f} | {t_hbm} | "
        f"{'memory' if b['t_bytes'] > b['t_flops'] else 'compute'} | {b['items_per_s']:,.1f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=("compile", "lower", "table"))
  parser.add_argument("--program", choices=PROGRAMS, default="ae_step")
  parser.add_argument("--slice", choices=tuple(SLICES), default="v5e-8")
  parser.add_argument("--dtype", choices=DTYPES, default="float32")
  parser.add_argument("--config", default="configs/ffhq.py")
  parser.add_argument("--set", action="append", default=[],
                      help="config override section.key=JSON value (repeatable)")
  parser.add_argument("--label", default="", help="names a variant in before/after rows")
  parser.add_argument("--labels", default=None, help="table: comma list of labels to show")
  parser.add_argument("--results", default=RESULTS)
  parser.add_argument("--aot_results", default="",
                      help="table: also rows from an infd_jax.aot sweep file (label aot)")
  parser.add_argument("--hlo_out", default="", help="compile: also write the optimized HLO here")
  args = parser.parse_args(argv)
  if args.command == "table":
    labels = None if args.labels is None else set(args.labels.split(","))
    extra = aot_records(pathlib.Path(args.aot_results)) if args.aot_results else []
    print(table(extra + _records(pathlib.Path(args.results)), labels))
    return 0
  try:
    compile_one(args)
  except checks.UserError as e:
    print(f"bench.roofline: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
