"""InceptionV3 of the FID papers ("pt_inception-2015-12-05") in Flax, NHWC.

Same layers as torchvision's Inception3 with TensorFlow's FID variants patched in
(as pytorch-fid and torch-fidelity do): the average pools of the A, C and first E
blocks ignore padded zeros, and the last E block max-pools. Input handling follows
torch-fidelity, which the INFD evaluation calls: uint8-valued RGB, TF1-style
bilinear resize to 299 (no half-pixel offset), then (x - 128) / 128. Output: the
2048-d features after the global average pool.

Weights: convert the pytorch-fid / torch-fidelity file once with
  python -m infd_jax.evaluation.inception --convert \
      --input=pt_inception-2015-12-05-6726825d.pth --output=inception_fid.npz
and load it with `load_inception_params`.
"""

import functools
import os
from typing import Any, Sequence

from absl import flags
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infd_jax import cli_flags

PyTree = Any
INPUT_SIZE = 299
FEATURE_DIM = 2048
# Keys of the PyTorch file that the 2048-d features do not use.
_UNUSED_TORCH_KEYS = ("fc.weight", "fc.bias")


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = self.padding
    # Plain nn.Conv (not layers.conv): kernels here are rectangular, and this frozen
    # evaluator needs neither init nor logical partitioning.
    x = nn.Conv(self.features, self.kernel, strides=self.strides, padding=((ph, ph), (pw, pw)),
                use_bias=False, dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TF's SAME average pool divides by the number of real (unpadded) inputs.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv, dtype=self.dtype)
    b1 = c(64, (1, 1), name="branch1x1")(x)
    b5 = c(48, (1, 1), name="branch5x5_1")(x)
    b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv, dtype=self.dtype)
    b3 = c(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = c(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = c(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv, dtype=self.dtype)
    c7 = self.channels_7x7
    b1 = c(192, (1, 1), name="branch1x1")(x)
    b7 = c(c7, (1, 1), name="branch7x7_1")(x)
    b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = c(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv, dtype=self.dtype)
    b3 = c(192, (1, 1), name="branch3x3_1")(x)
    b3 = c(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = c(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """pool='avg' for Mixed_7b; 'max' for Mixed_7c (a quirk of the TF FID graph)."""
  pool: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv, dtype=self.dtype)
    b1 = c(320, (1, 1), name="branch1x1")(x)
    b3 = c(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = c(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of TF1 resize_bilinear(align_corners=False): src = dst * in/out."""
  src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m


def resize_like_tf1(x: jax.Array, size: int) -> jax.Array:
  """Bilinear resize [B, H, W, C] -> [B, size, size, C] as TF1 (and torch-fidelity) does."""
  my = jnp.asarray(_tf1_bilinear_matrix(x.shape[1], size))
  mx = jnp.asarray(_tf1_bilinear_matrix(x.shape[2], size))
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", my, x, precision=hi)
  return jnp.einsum("pw,bowc->bopc", mx, x, precision=hi)


class FIDInceptionV3(nn.Module):
  """images [B, H, W, 3] with values in [0, 255] (any dtype) -> pool features [B, 2048] f32."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = resize_like_tf1(images.astype(jnp.float32), INPUT_SIZE)
    x = ((x - 128.0) / 128.0).astype(self.dtype)
    c = functools.partial(BasicConv, dtype=self.dtype)
    x = c(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = c(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, self.dtype, name="Mixed_5b")(x)
    x = InceptionA(64, self.dtype, name="Mixed_5c")(x)
    x = InceptionA(64, self.dtype, name="Mixed_5d")(x)
    x = InceptionB(self.dtype, name="Mixed_6a")(x)
    x = InceptionC(128, self.dtype, name="Mixed_6b")(x)
    x = InceptionC(160, self.dtype, name="Mixed_6c")(x)
    x = InceptionC(160, self.dtype, name="Mixed_6d")(x)
    x = InceptionC(192, self.dtype, name="Mixed_6e")(x)
    x = InceptionD(self.dtype, name="Mixed_7a")(x)
    x = InceptionE("avg", self.dtype, name="Mixed_7b")(x)
    x = InceptionE("max", self.dtype, name="Mixed_7c")(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def abstract_variables() -> PyTree:
  """ShapeDtypeStructs of {'params', 'batch_stats'} (nothing is allocated)."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)


# Flax leaf name -> PyTorch parameter/buffer name (conv kernels are also transposed).
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}


def _torch_key(path: Sequence[str]) -> str:
  """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
  return ".".join([*path[1:-1], _LEAF_TO_TORCH[path[-1]]])


def _flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
  return {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: dict[tuple[str, ...], Any]) -> PyTree:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return tree


def inception_params_from_torch_state_dict(sd: dict[str, np.ndarray]) -> PyTree:
  """Maps a pytorch-fid / torch-fidelity Inception state dict onto this module.

  Args:
    sd: e.g. {'Conv2d_1a_3x3.conv.weight': [32, 3, 3, 3], '....bn.running_mean': ...}.
      fc.* and BatchNorm num_batches_tracked entries are not needed and ignored.

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 numpy arrays.

  Raises:
    KeyError / ValueError: a needed key is missing, has the wrong shape, or the
      file has keys this network does not know.
  """
  flat, used = {}, set()
  for path, spec in _flat(abstract_variables()).items():
    key = _torch_key(path)
    if key not in sd:
      raise KeyError(f"state dict lacks {key!r} (is this the FID Inception file?)")
    w = np.asarray(sd[key], np.float32)
    if path[-1] == "kernel":
      w = w.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
    if w.shape != spec.shape:
      raise ValueError(f"{key}: shape {w.shape} does not fit {spec.shape}")
    flat[path] = w
    used.add(key)
  unknown = [k for k in sd if k not in used and k not in _UNUSED_TORCH_KEYS
             and not k.endswith("num_batches_tracked")]
  if unknown:
    raise ValueError(f"state dict has keys this network lacks: {unknown[:5]}...")
  return _unflat(flat)


def save_inception_params(variables: PyTree, path: str | os.PathLike) -> None:
  """Writes {'params', 'batch_stats'} to an .npz with '/'-joined keys."""
  np.savez(path, **{"/".join(p): np.asarray(v) for p, v in _flat(variables).items()})


def load_inception_params(path: str | os.PathLike) -> PyTree:
  """Reads the .npz written by the --convert CLI into {'params', 'batch_stats'}."""
  if not epath.Path(path).is_file():
    raise FileNotFoundError(
        f"Inception weights {path!s} not found. Convert pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth once with: python -m "
        "infd_jax.evaluation.inception --convert --input=<pth> --output=<npz>")
  with epath.Path(path).open("rb") as raw, np.load(raw) as f:
    flat = {tuple(k.split("/")): f[k] for k in f.files}
  expected = {p: s.shape for p, s in _flat(abstract_variables()).items()}
  got = {p: v.shape for p, v in flat.items()}
  if got != expected:
    bad = sorted(set(expected.items()) ^ set(got.items()))[:5]
    raise ValueError(f"{path!s} does not hold FID Inception weights; mismatches: {bad}")
  return _unflat({p: jnp.asarray(v) for p, v in flat.items()})


def _define(values: flags.FlagValues) -> None:
  flags.DEFINE_bool("convert", False, "convert a PyTorch Inception checkpoint to .npz",
                    flag_values=values)
  flags.DEFINE_string("input", None, "pt_inception-2015-12-05-6726825d.pth", flag_values=values)
  flags.DEFINE_string("output", None, "destination .npz", flag_values=values)
  flags.mark_flags_as_required(["input", "output"], flag_values=values)
  flags.register_validator("convert", bool, "--convert is the only action", flag_values=values)


def main(argv: Sequence[str] | None = None) -> None:
  args = cli_flags.parse("python -m infd_jax.evaluation.inception", __doc__, _define, argv)
  # Imported here: only the one-off conversion needs the checkpoint reader.
  from infd_jax.convert import torch_pickle  # pylint: disable=g-import-not-at-top
  sd = torch_pickle.load_torch_state_dict(args.input)
  save_inception_params(inception_params_from_torch_state_dict(sd), args.output)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
