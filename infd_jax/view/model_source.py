"""Samples of a trained model as virtual images of any size, rendered from the field.

Sample (seed, index) is `Model.sample_global([index], seed)`: the same latent as
`model.sample(n, seed)[index]`. Its feature map phi is decoded once and kept in an
LRU; every window of the virtual image at any scale is then one
`Model.render_local` call on that phi, equal to `model.render(z, size, window)`.
"""

import hashlib
import json
import re
from typing import Any

import jax
import numpy as np

from infd_jax import checks
from infd_jax.rendering.pixels import to_uint8
from infd_jax.view import caches, sources
from infd_jax.view.dzi import Window

_SAMPLE = re.compile(r"(\d+)-(\d+)")


class ModelSource:
  """Virtual square images `<seed>-<index>` at `size` pixels a side, 1..max_size.

  Args:
    model: an `infd_jax.load`ed Model with stage-2 parameters.
    phi_cache: feature maps kept (one per sample; each as large as the decoder output).
    max_size: largest accepted size.
  """

  kind = "model"

  def __init__(self, model: Any, *, phi_cache: int = 8, max_size: int = sources.MAX_SIZE):
    if model.dm_params is None:
      raise checks.UserError("the model has no stage-2 (diffusion) checkpoint to sample from")
    self.model, self.max_size = model, max_size
    self._phi = caches.LRU(phi_cache)
    self._fingerprint = None

  def image(self, name: str, size: str) -> sources.ImageRef:
    match = _SAMPLE.fullmatch(name)
    if not match:
      raise sources.BadRequest(f"sample {name[:40]!r} is not <seed>-<index>")
    seed = sources.parse_int(match[1], "seed", 0, sources.MAX_SEED)
    index = sources.parse_int(match[2], "index", 0, sources.MAX_INDEX)
    side = sources.parse_int(size, "size", 1, self.max_size)
    return sources.ImageRef(name=f"{seed}-{index}", size=str(side), hw=(side, side),
                            key=(seed, index))

  def render(self, ref: sources.ImageRef, level_hw: tuple[int, int], window: Window
             ) -> np.ndarray:
    phi = self._phi.get_or_make(ref.key, lambda: self._decode(*ref.key))
    _, images = self.model.render_local(phi, level_hw, window)
    return to_uint8(images[0])

  def _decode(self, seed: int, index: int) -> jax.Array:
    """phi [1, ...] of one sample, replicated: its tiles spread over all devices."""
    z = self.model.sample_global(np.array([index]), seed)
    return self.model.phi_row(self.model.decode_global(z), 0)

  @property
  def cached_samples(self) -> int:
    return len(self._phi)

  def fingerprint(self) -> str:
    """sha256 of the parameters and the settings that shape a sample and its render."""
    if self._fingerprint is None:
      digest = hashlib.sha256()
      config = self.model.config
      settings = {k: config[k].to_dict() for k in ("ae", "dm", "diffusion", "sample")}
      digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
      for params in (self.model.ae_params, self.model.dm_params):
        for leaf in jax.tree.leaves(params):  # one leaf on the host at a time
          digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
      self._fingerprint = digest.hexdigest()
    return self._fingerprint

  def describe(self) -> dict[str, Any]:
    devices = [str(d) for d in self.model.mesh.devices.flat]
    return {"kind": self.kind, "max_size": self.max_size, "max_seed": sources.MAX_SEED,
            "max_index": sources.MAX_INDEX, "devices": devices}
