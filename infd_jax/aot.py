"""Ahead-of-time fit check: compile a hot path for a TPU slice on a CPU host.

  python -m infd_jax.aot --config=configs/ffhq.py --config.stage=ae --topology=v5p:2x2x2
  python -m infd_jax.aot --config=configs/ffhq.py --config.stage=dm --topology=v5e:4x8 --batch=64
  python -m infd_jax.aot --config=configs/ffhq.py --config.stage=sample --topology=v6e:2x4

`--config.stage` picks the programs: `ae` / `dm` the training step of that stage,
`sample` the DDIM sampler (quantize and decode included) and one call of the
tiled renderer. libtpu (`pip install -r requirements-tpu.txt`) compiles for a
topology described with `jax.experimental.topologies`, so no TPU is needed;
`--topology=cpu` compiles for this host's devices instead (a CPU-backend plan,
not a TPU one). Inputs are abstract (shapes and shardings only): nothing is
allocated. For each program it prints XLA's per-chip memory plan (arguments,
outputs, temporaries, total = arguments + outputs + temporaries - aliased),
its FLOP and byte counts, the compile time and whether the total fits the
chip's HBM, and appends one JSON line to `--results`; a (config, overrides,
stage, program, topology, batch) already there is skipped, so an interrupted
sweep restarts where it stopped.
"""

import dataclasses
import json
import re
import sys
import time
from typing import Any, Callable

from absl import app, flags, logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from infd_jax import builders, configs, sharding
from infd_jax.model import Model
from infd_jax.training import ae_task, dm_task, loop
from infd_jax.builders import UserError

PyTree = Any
GIB = 2 ** 30
# HBM per chip (GiB) of the TPU generations libtpu compiles for.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
STAGE_PROGRAMS = {"ae": ("ae_step",), "dm": ("dm_step",), "sample": ("ddim_sampler", "render")}


@dataclasses.dataclass
class Program:
  """A jitted function and abstract arguments (shapes, dtypes, shardings) to lower it with."""
  name: str
  fn: Callable
  args: tuple


def topology_devices(topology: str) -> list[jax.Device]:
  """Compile-only TPU devices of e.g. "v5p:2x2x2", or this host's devices for "cpu"."""
  if topology == "cpu":
    return jax.devices()
  if not _TOPOLOGY.match(topology):
    raise UserError(f"--topology={topology!r}: use GENERATION:AxB[xC] with a generation of "
                    f"{sorted(HBM_GIB)} (e.g. v5p:2x2x2, v5e:2x4), or cpu")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(topology, "tpu").devices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing or a shape it rejects)
    reason = re.sub(r"\s+", " ", str(e))[:200]
    raise UserError(f"--topology={topology}: libtpu cannot describe it ({reason}); "
                    "is libtpu installed (pip install -r requirements-tpu.txt)?") from e


def _abstract(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _params(init_fn, pick: Callable, mesh, rules) -> PyTree:
  """Abstract parameters picked from a task's state, sharded by the config's rules."""
  abstract, _, _ = loop.initial_state(init_fn, mesh, rules, 0)
  return pick(abstract)


def synthetic_batch(config, stage: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A host batch of the real shapes and dtypes of `stage`'s training step."""
  rng = np.random.default_rng(seed)
  if stage == "ae":
    r, p = config.data.inp_res, config.data.patch
    return ae_task.synthetic_batch(rng, batch, inp_res=r, patch=p)
  if config.train.latent_cache:
    return {"z": rng.normal(size=(batch, *builders.latent_shape(config))).astype(np.float32)}
  r = config.data.inp_res  # the step runs the frozen encoder on images itself
  return {"inp": rng.uniform(-1, 1, (batch, r, r, 3)).astype(np.float32)}


def train_program(config, stage: str, batch: int, mesh) -> tuple[Program, Callable]:
  """The training step of `stage` with abstract (state, batch, consts).

  Returns the program and the state initialiser (for callers that run it).
  """
  rules = sharding.config_rules(config.mesh)
  if stage == "ae":
    step = ae_task.make_step(config)
    init_fn = ae_task.init_fn(config)
    x = np.zeros((1, 64, 64, 3), np.float32)
    lp = jax.eval_shape(lambda: nn.unbox(  # as load_lpips_params gives them: plain arrays
        builders.lpips(config).init(jax.random.PRNGKey(0), x, x, False)))
    consts = (_abstract(lp, jax.tree.map(lambda _: sharding.replicated(mesh), lp)),)
  else:
    step = dm_task.make_step(config)
    init_fn = dm_task.init_fn(config)
    consts = ((None,) if config.train.latent_cache else
              (_params(ae_task.init_fn(config), lambda s: s.gen_params, mesh, rules),))
  state, shardings, init = loop.initial_state(init_fn, mesh, rules, 0)
  data = synthetic_batch(config, stage, batch)
  batch_spec = _abstract(data, jax.tree.map(lambda _: sharding.batch_sharding(mesh), data))
  jitted = jax.jit(step, out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return Program(f"{stage}_step", jitted, (state, batch_spec, *consts)), init


def sampler_program(config, batch: int, mesh) -> Program:
  """Sampling (diffusion.sample_steps) -> quantize -> decode of `batch` latents, as generation runs it."""
  rules = sharding.config_rules(config.mesh)
  dm_params = _params(dm_task.init_fn(config), lambda s: s.params, mesh, rules)
  ae_params = _params(ae_task.init_fn(config), lambda s: s.gen_params, mesh, rules)
  keys = jax.ShapeDtypeStruct((batch, 2), jnp.uint32, sharding=sharding.batch_sharding(mesh))
  model = Model(config, mesh, ae_params=None)
  return Program("ddim_sampler", model.generation_program(), (dm_params, ae_params, keys))


def render_program(config, batch: int, mesh) -> Program:
  """One call of `Model`'s tiled renderer: `sample.tiles_per_call` padded tiles of `batch`
  images (phi replicated, the call's tiles spread over the devices)."""
  rules = sharding.config_rules(config.mesh)
  ae_params = _params(ae_task.init_fn(config), lambda s: s.gen_params, mesh, rules)
  model = Model(config, mesh, ae_params=None)
  z = jax.ShapeDtypeStruct((batch, *builders.latent_shape(config)), jnp.float32)
  phi = jax.eval_shape(lambda p, z: model.ae.apply({"params": p}, z, method="decode"),
                       ae_params, z)
  rep = sharding.replicated(mesh)
  phi = jax.ShapeDtypeStruct(phi.shape, phi.dtype, sharding=rep)
  n, h = config.sample.tiles_per_call, config.sample.tile + 2 * config.sample.pad
  n = -(-n // mesh.size) * mesh.size  # whole tiles per device, as a spread call rounds them
  axis = jax.ShapeDtypeStruct((n, h), jnp.float32, sharding=rep)
  return Program("render", model.renderer.tiles_program(phi),
                 ({"params": ae_params}, phi, axis, axis,
                  jax.ShapeDtypeStruct((2,), jnp.float32, sharding=rep)))


def analysis(compiled) -> dict[str, Any]:
  """XLA's per-device memory plan (bytes) and cost analysis of a compiled program."""
  m = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return {"argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes),
          "alias_bytes": int(m.alias_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes),
          "total_bytes": int(total),
          "flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")}


def default_batch(config, stage: str) -> int:
  return {"ae": config.train.ae_batch_size, "dm": config.train.dm_batch_size}.get(
      stage, config.sample.batch_size)


def check_batch(batch: int, mesh) -> None:
  n = mesh.devices.size
  if batch <= 0 or batch % n:
    raise UserError(f"--batch={batch} does not divide over the {n} devices of the mesh "
                    f"{dict(mesh.shape)}; use a multiple of {n} (e.g. {n}, {2 * n}, {4 * n})")


def compile_program(program: Program) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = program.fn.lower(*program.args).compile()
  return compiled, time.perf_counter() - start


def _done(path: epath.Path) -> set[str]:
  if not path.exists():
    return set()
  return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def _overrides(argv: list[str]) -> list[str]:
  return sorted(a for a in argv if a.startswith("--config.") and not a.startswith("--config.stage"))


def _fmt_gib(b: int) -> str:
  return f"{b / GIB:.2f} GiB"


def run(config, *, config_path: str, overrides: list[str], topology: str, batch: int,
        results: epath.Path) -> list[dict[str, Any]]:
  """Compiles the programs of `config.stage` for `topology`; returns (and appends) records."""
  stage = config.stage
  if stage not in STAGE_PROGRAMS:
    raise UserError(f"config.stage={stage!r}: the AOT check compiles {sorted(STAGE_PROGRAMS)}")
  devices = topology_devices(topology)
  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
  except ValueError as e:
    raise UserError(f"{e} (topology {topology})") from e
  batch = batch or default_batch(config, stage)
  if stage != "sample":  # the sampler's batch is not sharded
    check_batch(batch, mesh)
  generation = topology.split(":")[0]
  hbm = HBM_GIB.get(generation)
  done = _done(results)
  records = []
  for name in STAGE_PROGRAMS[stage]:
    key = json.dumps([config_path, overrides, stage, name, topology, batch])
    if key in done:
      print(f"{name} {topology} batch {batch}: already in {results}, skipped", flush=True)
      continue
    print(f"{name} {topology} ({len(devices)} chips, {devices[0].device_kind}) batch {batch}: "
          "compiling ...", flush=True)
    if name in ("ae_step", "dm_step"):
      program, _ = train_program(config, stage, batch, mesh)
    elif name == "ddim_sampler":
      program = sampler_program(config, batch, mesh)
    else:
      program = render_program(config, batch, mesh)
    compiled, seconds = compile_program(program)
    record = {"key": key, "config": config_path, "overrides": overrides, "stage": stage,
              "program": name, "topology": topology, "chips": len(devices),
              "device_kind": devices[0].device_kind, "batch": batch,
              "compute_dtype": config.train.compute_dtype, "compile_s": round(seconds, 1),
              **analysis(compiled), "hbm_bytes": hbm * GIB if hbm else None}
    record["fits"] = None if hbm is None else record["total_bytes"] <= hbm * GIB
    unit = "device" if topology == "cpu" else "chip"
    print(f"  per {unit}: arguments {_fmt_gib(record['argument_bytes'])}, outputs "
          f"{_fmt_gib(record['output_bytes'])}, temporaries {_fmt_gib(record['temp_bytes'])}, "
          f"total {_fmt_gib(record['total_bytes'])}"
          + (f" of {hbm} GiB HBM: {'fits' if record['fits'] else 'DOES NOT FIT'}" if hbm else
             " (CPU-backend plan, no HBM check)"), flush=True)
    print(f"  XLA: {record['flops'] or 0:.3e} FLOPs, {record['bytes_accessed'] or 0:.3e} bytes "
          f"accessed; compiled in {seconds:.1f} s", flush=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
      f.write(json.dumps(record) + "\n")
    records.append(record)
  return records


def _cli() -> None:
  """`python -m infd_jax.aot`: flags are defined here, so importing the module defines none."""
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Experiment config: a file or a packaged name (configs/ffhq.py, ffhq).",
      lock_config=True)
  topology = flags.DEFINE_string("topology", None,
                                 "TPU topology, e.g. v5p:2x2x2, v5e:4x8; or cpu.")
  batch = flags.DEFINE_integer("batch", 0, "Global batch (0 = the config's batch for the stage).")
  results = flags.DEFINE_string("results", "aot_results.jsonl", "JSON-lines file to append to.")
  flags.mark_flags_as_required(["config", "topology"])

  def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    try:
      run(config_flag.value, config_path=flags.FLAGS["config"].config_filename,
          overrides=_overrides(sys.argv), topology=topology.value, batch=batch.value,
          results=epath.Path(results.value))
    except UserError as e:
      print(f"infd_jax.aot: error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(main, flags_parser=lambda argv: flags.FLAGS(configs.resolve_argv(argv)))


if __name__ == "__main__":
  _cli()
