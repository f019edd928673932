"""Load test of the deep-zoom viewer's server on 127.0.0.1: throughput, latency, memory.

  python -m bench.view_load --path=workdir/demo --requests=2000 --clients=32 --size=16384

Starts `python -m infd_jax.view PATH --port=0` (a fresh tile cache in a temporary
folder), warms it up with one tile per level, then sends `--requests` GETs of tiles
drawn at random (`--pattern=screens`: blocks of 4 x 3 neighbours, as a viewer asks
for a screen; `random`: single tiles) from about `--distinct` tiles of the deepest
`--levels` levels of `--samples` samples, from `--clients` threads with keep-alive
connections, all to 127.0.0.1, and stops after `--time_limit` seconds at most.
Prints one JSON line:
throughput, latency percentiles, failures (status other than 200, or no
answer), the server's peak resident memory (VmHWM) and its batching counters;
`--out` appends it to a file. Then stops the server.
"""

import argparse
import datetime
import http.client
import json
import math
import os
import platform
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time


def _screens(args, max_level: int, tile: int) -> list[list[str]]:
  """Groups of tile URLs requested together, drawn with a fixed seed.

  `random`: single tiles anywhere; `screens`: blocks of 4 x 3 neighbouring tiles, as a
  viewer asks for one screen. About `--distinct` tiles in all (fewer if the levels
  have fewer).
  """
  grids = {}
  for level in range(max(0, max_level - args.levels + 1), max_level + 1):
    grids[level] = math.ceil(math.ceil(args.size / 2 ** (max_level - level)) / tile)
  block = (4, 3) if args.pattern == "screens" else (1, 1)
  count = min(args.distinct, args.samples * sum(n * n for n in grids.values()))
  rng, screens, seen = random.Random(0), [], set()
  while len(seen) < count:
    level = rng.choice(list(grids))
    n, sample = grids[level], rng.randrange(args.samples)
    c0, r0 = rng.randrange(max(1, n - block[0] + 1)), rng.randrange(max(1, n - block[1] + 1))
    screen = [f"/dzi/{args.seed}-{sample}/{args.size}_files/{level}/{c}_{r}.png"
              for r in range(r0, min(n, r0 + block[1])) for c in range(c0, min(n, c0 + block[0]))]
    if not seen.issuperset(screen):
      screens.append(screen)
      seen.update(screen)
  return screens


def _memory_kib(pid: int, field: str) -> int:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def _start(args, cache: str) -> tuple[subprocess.Popen, str, int]:
  command = [sys.executable, "-m", "infd_jax.view", args.path, "--port=0", f"--size={args.size}",
             f"--cache_dir={cache}", f"--tile_size={args.tile_size}"]
  server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
  for line in server.stdout:
    if "open http://" in line:
      address = line.split("open http://", 1)[1].split("/", 1)[0]
      host, port = address.rsplit(":", 1)
      return server, host, int(port)
  raise RuntimeError(f"the server stopped before serving (exit code {server.wait()})")


def _load(host: str, port: int, screens: list[list[str]], args
          ) -> tuple[list[float], int, int]:
  """(latencies of answered requests, failures, requests not sent in time)."""
  work: queue.Queue = queue.Queue()
  rng, queued = random.Random(1), 0
  while queued < args.requests:
    for path in rng.choice(screens)[:args.requests - queued]:
      work.put(path)
      queued += 1
  latencies, failures, lock = [], [0], threading.Lock()
  deadline = time.monotonic() + args.time_limit

  def client():
    connection = http.client.HTTPConnection(host, port, timeout=args.time_limit)
    while time.monotonic() < deadline:
      try:
        path = work.get_nowait()
      except queue.Empty:
        break
      started = time.monotonic()
      try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        ok = response.status == 200
      except (OSError, http.client.HTTPException):
        ok = False
        connection.close()
        connection = http.client.HTTPConnection(host, port, timeout=args.time_limit)
      with lock:
        if ok:
          latencies.append(time.monotonic() - started)
        else:
          failures[0] += 1
    connection.close()

  threads = [threading.Thread(target=client) for _ in range(args.clients)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return latencies, failures[0], work.qsize()


def _get_json(host: str, port: int, path: str) -> dict:
  connection = http.client.HTTPConnection(host, port, timeout=600)
  connection.request("GET", path)
  return json.loads(connection.getresponse().read())


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  p.add_argument("--path", required=True, help="workdir or converted checkpoint")
  p.add_argument("--requests", type=int, default=2000)
  p.add_argument("--clients", type=int, default=32)
  p.add_argument("--size", type=int, default=16384, help="virtual size of the samples")
  p.add_argument("--tile_size", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--samples", type=int, default=4, help="samples the tiles come from")
  p.add_argument("--levels", type=int, default=4, help="deepest levels the tiles come from")
  p.add_argument("--distinct", type=int, default=500, help="distinct tiles requested")
  p.add_argument("--pattern", choices=("random", "screens"), default="screens",
                 help="single tiles anywhere, or blocks of 4 x 3 neighbours (a viewer's screen)")
  p.add_argument("--time_limit", type=float, default=900, help="seconds for the load phase")
  p.add_argument("--out", default="", help="append the JSON line to this file")
  args = p.parse_args()
  max_level = (args.size - 1).bit_length()
  screens = _screens(args, max_level, args.tile_size)
  with tempfile.TemporaryDirectory(prefix="view_load_") as cache:
    server, host, port = _start(args, cache)
    try:
      started = time.monotonic()
      for level in range(max_level + 1):  # compiles each level's tile shapes
        _get_json(host, port, "/api/info")
        connection = http.client.HTTPConnection(host, port, timeout=900)
        connection.request("GET", f"/dzi/{args.seed}-0/{args.size}_files/{level}/0_0.png")
        assert connection.getresponse().read()
      warm_up = time.monotonic() - started
      before = _get_json(host, port, "/api/stats")
      started = time.monotonic()
      latencies, failures, unsent = _load(host, port, screens, args)
      elapsed = time.monotonic() - started
      after = _get_json(host, port, "/api/stats")
      info = _get_json(host, port, "/api/info")
      peak = _memory_kib(server.pid, "VmHWM")
    finally:
      server.terminate()
      server.wait(timeout=60)
  latencies.sort()
  pct = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)
  result = {
      "date": datetime.date.today().isoformat(), "host": platform.node(),
      "cpus": os.cpu_count(), "devices": info.get("devices"), "path": args.path,
      "size": args.size, "tile_size": args.tile_size, "requests": args.requests,
      "clients": args.clients, "pattern": args.pattern,
      "distinct_tiles": len({p for screen in screens for p in screen}), "samples": args.samples,
      "answered": len(latencies), "failed": failures, "not_sent": unsent,
      "seconds": round(elapsed, 2), "requests_per_s": round(len(latencies) / elapsed, 1),
      "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
      "server_peak_rss_mib": round(peak / 1024, 1), "warm_up_s": round(warm_up, 1),
      "render_calls": after.get("render_calls", 0) - before.get("render_calls", 0),
      "tiles_rendered": after.get("jobs", 0) - before.get("jobs", 0),
      "batches": after.get("batches", 0) - before.get("batches", 0),
      "tile_cache_mib": round(after["disk_bytes"] / 2 ** 20, 1),
  }
  line = json.dumps(result)
  print(line)
  if args.out:
    with open(args.out, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
