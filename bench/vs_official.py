"""Our hot paths against the official PyTorch code on the CPU, on the same weights.

  python -m bench.vs_official --official=/path/to/infd --torch_python=/path/to/venv/bin/python

Needs the official code (github.com/yinboc/infd: `--official` or $INFD_OFFICIAL)
and a Python with torch (`--torch_python` or $INFD_TORCH_PYTHON; this Python if
it imports torch). Without them it says how to get them and exits with 2.

The official side (`bench/official_worker.py`) builds the official FFHQ model
with seeded weights and saves it; `infd_jax.convert` converts that checkpoint,
so both sides run the same weights. Then, for `--rounds` rounds, each workload
runs in a fresh process per side (the order alternating between rounds), pinned
to the same `--threads` CPUs (each worker pins itself), with warm-up calls before
the timed ones. Our programs are compiled once beforehand into a persistent
cache in the workdir, so no measured process compiles (ours runs on JAX's CPU
backend, JAX_PLATFORMS=cpu):

  ae_step  one stage-1 training iteration (generator with L1 + LPIPS + VQ + adaptive
           GAN, then the discriminator; Adam), official FFHQ widths, `--ae_batch`
           images of `--ae_inp` px, ground-truth patches of `--ae_patch` px
  render   latents -> image at `--render_size` px with the official tiling (tile 256,
           8 px context; decode included), one latent; also the peak resident
           memory of the calls above the process's memory with the model loaded
           (`bench.cpu_measure.measure`)
  render_conv  one 3 x 3 convolution of the renderer's width on one tile with its
           context (272 x 272): the first residual block's conv1 (the kernel that
           most of the render's time is spent in), torch's against XLA's
  unet     one forward of the FFHQ UNet on `--unet_batch` latents

After the first round, each side's first output on the same inputs (the UNet's
output, the render, the step's losses) is compared: they must agree to a relative
1e-4 (the step's losses that LPIPS dropout draws into are only reported), so both
sides ran the same shapes and the same computation. Reports per workload the
median (over rounds) of each process's median CPU time per call, the ratio
official / ours (> 1: ours is faster), the agreement and the load average, and
appends one JSON line to `--results`. Measure on a quiet machine: torch's worker
threads spin at their barriers, and when another process holds one of the CPUs a
small official call takes 20-130 times its CPU time (the narrow UNet: 0.01 s with
one thread, 0.2-1.3 s with two at a load of 4 on 2 cores). The added memory
depends on glibc's arenas (XLA's threads get their own unless MALLOC_ARENA_MAX
is set; both sides inherit this process's environment, which the record keeps).
"""

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKLOADS = ("ae_step", "render", "render_conv", "unet")
TILE_WITH_CONTEXT = 256 + 2 * 8  # the official render tile and its context on both sides
AGREE = 1e-4  # relative agreement of the two sides' outputs on the same weights
WITH_DROPOUT = ("perc_loss", "adaptive_g_w", "disc_loss", "disc_logits_fake", "loss")
HOW_TO = """To get them (a throwaway environment; never a dependency of infd_jax):
  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch==2.13.0 numpy einops pyyaml omegaconf tqdm tensorboardX pillow
  git clone https://github.com/yinboc/infd /tmp/infd_official
then: python -m bench.vs_official --official=/tmp/infd_official --torch_python=/tmp/torchenv/bin/python"""


def find_torch_python(flag: str | None) -> str | None:
  """The --torch_python flag, else $INFD_TORCH_PYTHON, else this Python if it has torch."""
  path = flag or os.environ.get("INFD_TORCH_PYTHON")
  if path:
    return path
  return sys.executable if importlib.util.find_spec("torch") else None


def check_setup(official: str | None, torch_python: str | None) -> str | None:
  """One line saying what is missing, or None."""
  if not official:
    return "no official code: pass --official=DIR or set INFD_OFFICIAL"
  if not (pathlib.Path(official) / "models" / "infd.py").is_file():
    return f"--official={official}: no models/infd.py there (a checkout of yinboc/infd?)"
  if not torch_python:
    return "no Python with torch: pass --torch_python=PATH or set INFD_TORCH_PYTHON"
  probe = subprocess.run([torch_python, "-c", "import torch"], capture_output=True)
  if probe.returncode:
    return f"--torch_python={torch_python}: cannot import torch"
  return None


def make_inputs(path: pathlib.Path, latent: tuple[int, int, int], width: int, args) -> None:
  """Seeded inputs of every workload, in our layouts (NHWC, uint8 images) and the official's.

  `latent`: the model's latent shape (c, h, w) (the official `z_shape`); `width`: the
  renderer's hidden channels.
  """
  rng = np.random.default_rng(0)
  c, h, w = latent
  b, r, p = args.ae_batch, args.ae_inp, args.ae_patch
  inp = rng.integers(0, 256, (b, r, r, 3), dtype=np.uint8)
  gt = rng.integers(0, 256, (b, p, p, 3), dtype=np.uint8)
  to_float = lambda x: (x.astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2).copy()
  # The ground truth is the P x P window at (P/2, P/2) of a 2P x 2P image.
  crop = np.asarray([2 * p, p // 2, p // 2], np.int32)
  unet_x = rng.standard_normal((args.unet_batch, h, w, c)).astype(np.float32)
  render_z = rng.standard_normal((1, h, w, c)).astype(np.float32)
  conv_x = rng.standard_normal((1, TILE_WITH_CONTEXT, TILE_WITH_CONTEXT, width)).astype(np.float32)
  np.savez(path, ae_inp_uint8=inp, ae_gt_uint8=gt, ae_inp=to_float(inp), ae_gt=to_float(gt),
           ae_crop=crop, unet_x=unet_x.transpose(0, 3, 1, 2).copy(), unet_x_nhwc=unet_x,
           unet_t=rng.integers(0, 1000, args.unet_batch).astype(np.int32),
           render_z=render_z.transpose(0, 3, 1, 2).copy(), render_z_nhwc=render_z,
           conv_x=conv_x.transpose(0, 3, 1, 2).copy(), conv_x_nhwc=conv_x)


def run_side(side: str, what: str, args, work: pathlib.Path) -> dict:
  """One fresh process measuring `what` on one side; its JSON result."""
  common = ["--what", what, "--threads", str(args.threads), "--warmup", str(args.warmup),
            "--repeats", str(args.repeats), "--size", str(args.render_size),
            "--output", str(work / f"out_{side}_{what}.npz")]
  if side == "official":
    cmd = [args.torch_python, str(REPO / "bench" / "official_worker.py"),
           "--official", args.official, "--lpips_weights", str(_lpips_weights()), "time",
           "--arch", args.arch,
           "--model", str(work / "model.pth"), "--inputs", str(work / "inputs.npz"), *common]
  else:
    cmd = [sys.executable, "-m", "bench.vs_official_ours", "--workdir", str(work),
           "--tiles_per_call", str(args.tiles_per_call), *common]
  env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
             JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  if out.returncode or not lines:
    raise RuntimeError(f"{side} {what} failed ({out.returncode}):\n{out.stderr[-3000:]}")
  return json.loads(lines[-1])


def _lpips_weights() -> pathlib.Path:
  from infd_jax.models import lpips  # pylint: disable=g-import-not-at-top
  return lpips.lpips_weights_path()


def prepare(args, work: pathlib.Path) -> None:
  """The official checkpoint, its conversion and the inputs (kept in the workdir)."""
  if not (work / "model.pth").exists():
    subprocess.run([args.torch_python, str(REPO / "bench" / "official_worker.py"),
                    "--official", args.official, "--lpips_weights", str(_lpips_weights()), "save",
                    "--arch", args.arch, "--out", str(work / "model.pth")], check=True, cwd=REPO)
  if not (work / "converted").exists():
    subprocess.run([sys.executable, "-m", "infd_jax.convert", "--input", str(work / "model.pth"),
                    "--output", str(work / "converted")], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
  from infd_jax.convert import mapping  # pylint: disable=g-import-not-at-top
  conv1 = mapping.load_converted(work / "converted")["ae"]["renderer"]["model_1"]["conv1"]
  make_inputs(work / "inputs.npz", json.loads((work / "model.json").read_text())["z_shape"],
              conv1["kernel"].shape[2], args)


def agreement(work: pathlib.Path, what: str) -> dict[str, float]:
  """Per output, max |ours - official| / max |official| of the two sides' first calls.

  Images and the UNet output must agree as converted weights do (AGREE); of the
  step's losses only those without LPIPS dropout (random on each side) are held to it.
  """
  ours, official = (np.load(work / f"out_{side}_{what}.npz") for side in ("ours", "official"))
  common = sorted(set(ours) & set(official))
  if not common or any(ours[k].shape != official[k].shape for k in common):
    raise RuntimeError(f"{what}: the outputs differ in names or shapes")
  rel = {k: float(np.max(np.abs(ours[k] - official[k])) / max(np.max(np.abs(official[k])), 1e-12))
         for k in common}
  bad = {k: v for k, v in rel.items() if k not in WITH_DROPOUT and not v <= AGREE}
  if bad:
    raise RuntimeError(f"{what}: ours and the official differ beyond {AGREE}: {bad}")
  return rel


def summarize(results: dict[str, dict[str, list[dict]]]) -> dict:
  summary = {}
  for what, sides in results.items():
    med = {side: statistics.median(statistics.median(r["cpu_s"]) for r in runs)
           for side, runs in sides.items()}
    entry = {f"{side}_cpu_s": round(v, 3) for side, v in med.items()}
    entry["ratio_official_over_ours"] = round(med["official"] / med["ours"], 3)
    if what == "render":
      for side, runs in sides.items():
        entry[f"{side}_peak_mib"] = round(statistics.median(r["peak_mib"] for r in runs), 1)
    summary[what] = entry
  return summary


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.vs_official", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--official", default=os.environ.get("INFD_OFFICIAL"))
  parser.add_argument("--torch_python", default=None)
  parser.add_argument("--arch", choices=("ffhq", "narrow"), default="ffhq",
                      help="official FFHQ widths, or the fixtures' narrow ones (demo scale)")
  parser.add_argument("--what", default=",".join(WORKLOADS))
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=3,
                      help="0: only prepare the workdir (checkpoints, inputs, our compilations)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--ae_batch", type=int, default=2)
  parser.add_argument("--ae_inp", type=int, default=64)
  parser.add_argument("--ae_patch", type=int, default=64)
  parser.add_argument("--unet_batch", type=int, default=4)
  parser.add_argument("--render_size", type=int, default=512)
  parser.add_argument("--tiles_per_call", type=int, default=0,
                      help="our render's tiles per call (0: the model's sample.tiles_per_call); "
                      "1 bounds its memory at one tile's activations")
  parser.add_argument("--workdir", default=None, help="kept between runs (default: a temp dir)")
  parser.add_argument("--results", default="bench/results/vs_official.jsonl")
  args = parser.parse_args(argv)
  args.torch_python = find_torch_python(args.torch_python)
  what = [w for w in args.what.split(",") if w]
  problem = check_setup(args.official, args.torch_python)
  if problem is None and (set(what) - set(WORKLOADS) or not what):
    problem = f"--what={args.what}: choose from {','.join(WORKLOADS)}"
  if problem is None and args.threads > len(os.sched_getaffinity(0)):
    problem = f"--threads={args.threads}: this process may use {len(os.sched_getaffinity(0))} CPUs"
  if problem:
    print(f"bench.vs_official: {problem}\n{HOW_TO}", file=sys.stderr)
    return 2
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="vs_official_")) / args.arch
  work.mkdir(parents=True, exist_ok=True)
  prepare(args, work)
  for w in what:  # fills our compilation cache; not measured
    run_side("ours", w, argparse.Namespace(**vars(args) | {"warmup": 1, "repeats": 0}), work)
  if not args.rounds:
    print(f"bench.vs_official: {work} prepared (--rounds=0: nothing measured)")
    return 0
  results = {w: {"official": [], "ours": []} for w in what}
  load = [os.getloadavg()[0]]
  for k in range(args.rounds):
    for w in what:
      for side in (("official", "ours") if k % 2 == 0 else ("ours", "official")):
        r = run_side(side, w, args, work)
        results[w][side].append(r)
        print(f"round {k + 1} {w:8s} {side:8s} cpu {statistics.median(r['cpu_s']):8.2f} s"
              + (f", peak +{r['peak_mib']:.0f} MiB" if "peak_mib" in r else ""), flush=True)
    load.append(os.getloadavg()[0])
    if k == 0:
      check = {w: agreement(work, w) for w in what}
      print("agreement (max |ours - official| / max |official|):", json.dumps(check), flush=True)
  record = {"date": time.strftime("%Y-%m-%d %H:%M"), "arch": args.arch, "threads": args.threads,
            "rounds": args.rounds, "load_avg_1min": load, "cpus": os.cpu_count(),
            "tiles_per_call": args.tiles_per_call, "env": {k: os.environ[k] for k in ("XLA_FLAGS", "MALLOC_ARENA_MAX") if k in os.environ},
            "sizes": {k: getattr(args, k) for k in ("ae_batch", "ae_inp", "ae_patch",
                                                    "unet_batch", "render_size")},
            "summary": summarize(results), "agreement": check, "runs": results}
  print(json.dumps(record["summary"], indent=1))
  results_path = pathlib.Path(args.results)
  results_path.parent.mkdir(parents=True, exist_ok=True)
  with results_path.open("a") as f:
    f.write(json.dumps(record) + "\n")
  if args.workdir is None:
    shutil.rmtree(work.parent)
  return 0


if __name__ == "__main__":
  sys.exit(main())
