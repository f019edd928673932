"""`infd view PATH` (or `python -m infd_jax.view PATH`): the deep-zoom viewer's server.

PATH is a training workdir or a converted checkpoint (samples rendered from the
model on demand), or a folder of PNG/JPEG/WebP/TIFF images or one such file (the
project's outputs, shown without a model). Settings are checked, and the port
bound, before anything loads; a mistake is one line on stderr and exit code 2.
"""

import argparse
import os
import pathlib
import sys
import tempfile
from typing import NoReturn, Sequence

from infd_jax import checks
from infd_jax.view import sources


class _Parser(argparse.ArgumentParser):
  def error(self, message: str) -> NoReturn:
    _fail(message)


def _fail(message: str) -> NoReturn:
  print(f"infd view: error: {message}", file=sys.stderr)
  sys.exit(2)


def parser() -> argparse.ArgumentParser:
  p = _Parser(prog="infd view", description=__doc__.split("\n\n", 1)[0])
  p.add_argument("path", help="workdir, converted checkpoint, image folder or image file")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this "
                 "machine only; 0.0.0.0 serves every network the host is on)")
  p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
  p.add_argument("--size", type=int, default=65536,
                 help="virtual size of a sample shown first, pixels a side")
  p.add_argument("--max_size", type=int, default=sources.MAX_SIZE,
                 help="largest virtual size served (up to 2^20)")
  p.add_argument("--seed", type=int, default=0, help="seed of the sample shown first")
  p.add_argument("--tile_size", type=int, default=256, help="DZI tile side, pixels")
  p.add_argument("--overlap", type=int, default=1, help="DZI tile overlap, pixels")
  p.add_argument("--cache_dir", default="default",
                 help="folder of rendered tiles, kept across runs ('default': "
                 "~/.cache/infd_jax/view or under $XDG_CACHE_HOME; 'off': a temporary one)")
  p.add_argument("--cache_mb", type=int, default=1024, help="disk the tile cache may use")
  p.add_argument("--phi_cache", type=int, default=8, help="samples whose feature map is kept")
  p.add_argument("--max_export", type=int, default=8192, help="largest side of a saved view")
  p.add_argument("--compile_cache", default="default",
                 help="JAX's persistent compilation cache folder ('default', 'off' or a folder)")
  return p


def check(args: argparse.Namespace) -> None:
  """Raises UserError for any invalid setting (before anything loads)."""
  limits = {"size": (1, args.max_size), "max_size": (1, sources.MAX_SIZE),
            "port": (0, 65535), "tile_size": (16, 2048), "overlap": (0, args.tile_size // 4),
            "cache_mb": (1, 1 << 24), "phi_cache": (1, 1024), "max_export": (16, 1 << 15),
            "seed": (0, sources.MAX_SEED)}
  for name in ("max_size", "tile_size", "size", "overlap", "port", "cache_mb", "phi_cache",
               "max_export", "seed"):
    low, high = limits[name]
    if not low <= getattr(args, name) <= high:
      raise checks.UserError(f"--{name}={getattr(args, name)}: use {low}..{high}")
  if not pathlib.Path(args.path).exists():
    raise checks.UserError(f"{args.path}: no such file or folder")


def open_source(path: str, phi_cache: int, max_size: int):
  """A ModelSource for a workdir or converted checkpoint, else a FileSource of images."""
  from infd_jax.view import file_source, model_source  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(path)
  if folder.is_dir():
    import infd_jax  # pylint: disable=g-import-not-at-top
    try:
      model = infd_jax.load(folder)
    except checks.UserError as not_a_model:
      try:
        return file_source.FileSource(folder)
      except checks.UserError:
        raise checks.UserError(f"{not_a_model}, and holds no PNG, JPEG, WebP or TIFF "
                               "images") from None
    return model_source.ModelSource(model, phi_cache=phi_cache, max_size=max_size)
  return file_source.FileSource(folder)


def run(argv: Sequence[str] | None = None) -> None:
  args = parser().parse_args(argv)
  try:
    check(args)
  except checks.UserError as e:
    _fail(str(e))
  from infd_jax.view import server  # pylint: disable=g-import-not-at-top
  try:
    sock = server.bind(args.host, args.port)
  except OSError as e:
    _fail(f"--host={args.host} --port={args.port}: cannot listen there ({e.strerror or e})")
  from infd_jax import compile_cache, logs  # pylint: disable=g-import-not-at-top
  logs.configure(0)
  compile_cache.enable(args.compile_cache)
  try:
    source = open_source(args.path, args.phi_cache, args.max_size)
  except checks.UserError as e:
    _fail(str(e))
  with tempfile.TemporaryDirectory(prefix="infd_view_") as scratch:
    cache_dir = {"off": scratch, "default": str(compile_cache.default_dir().parent / "view")
                 }.get(args.cache_dir, os.path.expanduser(args.cache_dir))
    app = build_app(source, cache_dir, args)
    print(f"infd view: {source.kind} {args.path}; tiles cached in {cache_dir}", flush=True)
    print(f"infd view: open {server.url(sock)}  (Ctrl-C stops)", flush=True)
    server.server(app).run(sockets=[sock])


def build_app(source, cache_dir: str, args: argparse.Namespace):
  """The web app for a source with the settings of `args`."""
  from infd_jax.view import batching, caches, server, tiles  # pylint: disable=g-import-not-at-top
  service = tiles.TileService(
      source, caches.DiskCache(cache_dir, args.cache_mb << 20),
      batching.Batcher(source.render), tile_size=args.tile_size, overlap=args.overlap,
      max_export=args.max_export, max_scale=args.max_size)
  return server.make_app(service, {"size": args.size, "seed": args.seed})
