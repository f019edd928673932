"""The viewer's page in a real headless browser (Debian's chromium through selenium).

It loads a sample of the tiny model, zooms three levels into one point, and after
each step reads back every tile OpenSeadragon draws (the decoded pixels it holds)
and compares it with `Model.render` of that tile's window. Skipped, with the
reason, where chromium, chromedriver or selenium is missing (`.ci/run` installs them).
"""

import base64
import io
import math
import os
import shutil
import time
import urllib.parse

import numpy as np
import pytest
from PIL import Image

SIZE, TILE, OVERLAP = 2048, 128, 1  # the sample's virtual size; the server's DZI tiling
POINT = (0.3, 0.6)  # where the page zooms in, in viewport units (the image is 1 wide)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--no-proxy-server",
                  "--window-size=480,420")

_DRAWN = """
const done = arguments[arguments.length - 1];
const item = infdView.left.world.getItemAt(0);
Promise.all(item.getTilesToDraw().map(async (info) => {
  const ctx = await info.tile.getCache().getDataAs('context2d', true);
  return {level: info.tile.level, x: info.tile.x, y: info.tile.y,
          png: ctx.canvas.toDataURL('image/png')};
})).then(done, (e) => done(String(e)));
"""


def _browser(tmp_path):
  """A headless chromium driven by chromedriver, or a skip naming what is missing."""
  try:
    from selenium import webdriver  # pylint: disable=g-import-not-at-top
    from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  except ImportError:
    pytest.skip("selenium is not installed (pip install -r requirements.txt)")
  browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
  if not (browser and driver):
    pytest.skip("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
    options.add_argument(flag)
  return webdriver.Chrome(options=options, service=Service(driver))


def _wait(driver, script: str, timeout: float = 300) -> None:
  """Until `script` returns true three polls in a row (tiles settle between frames)."""
  deadline, streak = time.monotonic() + timeout, 0
  while streak < 3:
    if time.monotonic() > deadline:
      page_status = driver.execute_script("return document.getElementById('status').textContent")
      raise TimeoutError(f"{script}: still false after {timeout} s; page status {page_status!r}")
    streak = streak + 1 if driver.execute_script(script) else 0
    time.sleep(0.2)


def _window(level: int, col: int, row: int) -> tuple[int, tuple[int, int, int, int]]:
  side = math.ceil(SIZE / 2 ** (math.ceil(math.log2(SIZE)) - level))
  top, left = max(0, row * TILE - OVERLAP), max(0, col * TILE - OVERLAP)
  bottom, right = min(side, (row + 1) * TILE + OVERLAP), min(side, (col + 1) * TILE + OVERLAP)
  return side, (top, left, bottom - top, right - left)


def test_zooming_three_levels_shows_tiles_equal_to_model_render(view_server, tmp_path):
  driver = _browser(tmp_path)
  z = view_server.model.sample(1, seed=3)
  expected = {}

  def reference(level, col, row):
    if (level, col, row) not in expected:
      side, window = _window(level, col, row)
      images = view_server.model.render(z, side, window=window)[0]
      expected[level, col, row] = np.floor(np.clip(images / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    return expected[level, col, row]

  try:
    driver.set_script_timeout(120)
    driver.get(f"{view_server.url}#seed=3&index=0&size={SIZE}")
    _wait(driver, "return !!window.infdView && !!infdView.left && "
                  "infdView.left.world.getItemCount() > 0 && infdView.loaded()")
    deepest = []
    for step in range(4):
      if step:
        driver.execute_script(
            "const v = infdView.left.viewport;"
            f"v.zoomBy(2, new OpenSeadragon.Point({POINT[0]}, {POINT[1]}), true);"
            "v.applyConstraints(true);")
        time.sleep(0.5)
        _wait(driver, "return infdView.loaded()")
      drawn = driver.execute_async_script(_DRAWN)
      assert isinstance(drawn, list) and drawn, drawn
      for tile in drawn:
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(
            tile["png"].split(",", 1)[1]))).convert("RGB"))
        np.testing.assert_array_equal(shown, reference(tile["level"], tile["x"], tile["y"]),
                                      err_msg=str({k: tile[k] for k in ("level", "x", "y")}))
      deepest.append(max(tile["level"] for tile in drawn))
    assert deepest == list(range(deepest[0], deepest[0] + 4)), deepest
    shot = os.environ.get("INFD_VIEW_SCREENSHOT") or str(tmp_path / "deep_zoom.png")
    driver.save_screenshot(shot)
    _check_saved_view(driver, view_server, z)
    _check_side_by_side(driver)
  finally:
    driver.quit()


def _check_saved_view(driver, view_server, z):
  """The page's saved view (screen resolution) is the region rendered at that scale."""
  url = driver.execute_script("return infdView.savedViewUrl(1)")
  query = urllib.parse.parse_qs(url.split("?", 1)[1])
  x, y, w, h = (float(query[k][0]) for k in ("x", "y", "w", "h"))
  width = int(query["width"][0])
  assert 0 <= x and x + w <= 1 and 0 <= y and y + h <= 1, query  # deep inside the image
  status, body = view_server.get(url)
  assert status == 200, body
  side = round(width / w)  # the whole image at the saved scale
  top, left = int(y * side), int(x * side)
  window = (top, left, round((y + h) * side) - top, round((x + w) * side) - left)
  images = view_server.model.render(z, side, window=window)[0]
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))),
                                np.floor(np.clip(images / 2 + 0.5, 0, 1) * 255).astype(np.uint8))


def _check_side_by_side(driver):
  """A second size of the sample opens beside the first, at the same view."""
  driver.execute_script("document.getElementById('size2').value = '1024';"
                        "document.getElementById('compare').click();")
  _wait(driver, "return infdView.right.isOpen() && infdView.loaded()")
  left, right = driver.execute_script(
      "return [infdView.left, infdView.right].map((v) => {"
      "const b = v.viewport.getBounds(true); return [b.x, b.y, b.width, b.height]; })")
  np.testing.assert_allclose(right, left, rtol=0, atol=1e-6)
  assert driver.execute_script("return infdView.size2") == "1024"
