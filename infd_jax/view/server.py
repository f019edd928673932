"""The viewer's web app (Starlette, served by uvicorn): the page, DZI and saved views.

Routes:
  /                                            the page (OpenSeadragon)
  /static/...                                  its script, style and OpenSeadragon
  /api/info                                    the source, tiling and limits (JSON)
  /api/stats                                   cache and batching counters (JSON)
  /dzi/<image>/<size>.dzi                      DZI descriptor of an image
  /dzi/<image>/<size>_files/<level>/<c>_<r>.png  one tile
  /view.png?image=&size=&x=&y=&w=&h=&width=    a saved view
A bad request is answered 400, a missing thing 404, a full queue 503; an error
inside one request is a 500 for that request only, and the server goes on.
"""

import contextlib
import pathlib
import socket
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from infd_jax.view import batching, sources, tiles

STATIC = pathlib.Path(__file__).parent / "static"
_ERRORS = {sources.BadRequest: 400, sources.NotFound: 404, batching.Busy: 503}


def make_app(service: tiles.TileService, defaults: dict[str, Any]) -> Starlette:
  """The web app serving `service`; `defaults` (e.g. size, seed) go to the page."""

  async def info(request: Request) -> JSONResponse:
    del request
    return JSONResponse({**service.source.describe(), "tile_size": service.tile_size,
                         "overlap": service.overlap, "max_export": service.max_export,
                         "defaults": defaults})

  async def stats(request: Request) -> JSONResponse:
    del request
    source = service.source
    return JSONResponse({**service.batcher.stats, "pending": service.batcher.pending,
                         "disk_bytes": service.disk.total_bytes,
                         "cached_samples": getattr(source, "cached_samples", 0)})

  async def descriptor(request: Request) -> Response:
    p = request.path_params
    return Response(service.descriptor(p["image"], p["size"]), media_type="application/xml")

  async def tile(request: Request) -> Response:
    p = request.path_params
    data = await service.tile(p["image"], p["size"], p["level"], p["tile"])
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

  async def saved_view(request: Request) -> Response:
    data = await service.saved_view(request.query_params)
    return Response(data, media_type="image/png")

  async def page(request: Request) -> FileResponse:
    del request
    return FileResponse(STATIC / "index.html")

  async def refuse(request: Request, error: Exception) -> PlainTextResponse:
    del request
    status = next(code for kind, code in _ERRORS.items() if isinstance(error, kind))
    return PlainTextResponse(str(error), status_code=status)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    await service.batcher.start()
    try:
      yield
    finally:
      await service.batcher.stop()

  routes = [
      Route("/", page),
      Route("/api/info", info),
      Route("/api/stats", stats),
      Route("/dzi/{image}/{size}.dzi", descriptor),
      Route("/dzi/{image}/{size}_files/{level}/{tile}", tile),
      Route("/view.png", saved_view),
      Mount("/static", StaticFiles(directory=STATIC)),
  ]
  return Starlette(routes=routes, exception_handlers={k: refuse for k in _ERRORS},
                   lifespan=lifespan)


def bind(host: str, port: int) -> socket.socket:
  """A listening TCP socket on host:port (port 0: any free port); OSError if taken.

  Connections made before the server runs wait in the backlog.
  """
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
    sock.listen(1024)
  except OSError:
    sock.close()
    raise
  return sock


def url(sock: socket.socket) -> str:
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def server(app: Starlette, *, max_connections: int = 256) -> uvicorn.Server:
  """A uvicorn server for app; `serve(sockets=[bind(...)])` runs it.

  More than `max_connections` open connections are answered 503, which bounds
  the memory held by clients.
  """
  config = uvicorn.Config(app, log_level="warning", access_log=False,
                          limit_concurrency=max_connections, timeout_keep_alive=5)
  return uvicorn.Server(config)
