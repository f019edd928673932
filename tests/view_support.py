"""Helpers of the viewer's tests: a server on 127.0.0.1 in a thread, plain HTTP GETs."""

import threading
import time
import urllib.error
import urllib.request

from infd_jax.view import server


class ServerThread:
  """Serves a Starlette app on 127.0.0.1 (a free port) while the `with` block runs."""

  def __init__(self, app):
    self.sock = server.bind("127.0.0.1", 0)
    self.url = server.url(self.sock)
    self.server = server.server(app)
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                   daemon=True)

  def __enter__(self) -> "ServerThread":
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      if time.monotonic() > deadline or not self.thread.is_alive():
        raise RuntimeError("the viewer's server did not start")
      time.sleep(0.02)
    return self

  def __exit__(self, *exc) -> None:
    self.server.should_exit = True
    self.thread.join(timeout=30)

  def get(self, path: str, timeout: float = 600) -> tuple[int, bytes]:
    """(status, body) of GET url + path; HTTP errors are returned, not raised."""
    try:
      with urllib.request.urlopen(self.url + path.lstrip("/"), timeout=timeout) as response:
        return response.status, response.read()
    except urllib.error.HTTPError as e:
      return e.code, e.read()
