"""Maps an official INFD PyTorch state dict onto the infd_jax Flax parameter trees.

Converted checkpoint layout (written by `save_converted`, read by `load_converted`):

  DIR/params/        orbax StandardCheckpointer tree, only the parts present:
                       'ae':     INFDAutoencoder params {'encoder','quantizer','decoder','renderer'}
                       'disc':   {'params': ..., 'batch_stats': ...} of NLayerDiscriminator
                       'lpips':  LPIPS params (VGG16 slices + lin layers)
                       'dm':     UNet params (`z_dm.`, the raw weights)
                       'dm_ema': UNet params (`z_dm_ema.`, the EMA weights used for sampling)
  DIR/meta.json      {'model_name', 'model_args' (the official args, verbatim),
                      'parts', 'iter', 'source', 'param_counts', 'ae', 'disc', 'dm'};
                      'ae' / 'disc' / 'dm' are the constructor kwargs found from the
                      weights, the same keys as `config.ae` / `config.disc` /
                      `config.dm`: `INFDAutoencoder(**meta['ae'])`,
                      `PatchDiscriminator(**meta['disc'])`, `UNet(**meta['dm'])`
                      (dtype and other runtime fields are left to the caller).

Each part is the tree a module's `apply` takes under 'params' (for 'disc' both
collections): e.g. `UNet(**meta['dm']).apply({'params': tree['dm_ema']}, x, t)`.

Key mapping (REFERENCE.md 10.2/10.3), mechanical: a torch key `<prefix><path>.<leaf>`
has its prefix replaced per `_PREFIXES` (this removes the `nn.Sequential`
indices, e.g. `encoder.1.` -> `encoder/quant_conv/`); the remaining dotted path
is split into consecutive groups joined by "_" such that each group names a
child in the Flax tree (`down.1.block.0.conv1` -> `down_1_block_0/conv1`,
`input_blocks.4.1.qkv` -> `input_blocks_4_1/qkv`); the split must be unique.
The leaf `weight` becomes `kernel`, `scale` or `embedding` (whichever the Flax
module has), `bias` stays, BatchNorm `running_mean`/`running_var` go to
batch_stats `mean`/`var` and `num_batches_tracked` is dropped. The layout
change follows from the two shapes: Conv2d (O,I,kh,kw) -> (kh,kw,I,O);
1x1 Conv2d -> Dense (I,O) when the Flax layer is Dense; Conv1d (O,I,1) ->
Dense (I,O); Linear (O,I) -> (I,O); norms and embeddings as is.

Conversion fails with one error listing every torch key left unmapped, every
Flax leaf left unfilled and every shape disagreement. The architecture is read
from the weights (so reduced-width checkpoints of the same family convert too)
and cross-checked against the official args; other architectures are refused.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from infd_jax import paths
from infd_jax.convert.architecture import ConversionError, find_architecture
from infd_jax.models import autoencoder, discriminator, lpips, unet

PyTree = Any

Prefixes = tuple[tuple[str, str, tuple[str, ...]], ...]
# Torch key prefix -> (part, Flax path prefix). No prefix starts another one.
_PREFIXES: Prefixes = (
    ("encoder.0.", "ae", ("encoder",)),
    ("encoder.1.", "ae", ("encoder", "quant_conv")),
    ("decoder.0.", "ae", ("decoder", "post_quant_conv")),
    ("decoder.1.", "ae", ("decoder",)),
    ("quantizer.", "ae", ("quantizer",)),
    ("renderer.net.", "ae", ("renderer",)),
    ("disc.", "disc", ()),
    ("perc_loss.net.", "lpips", ()),
    *((f"perc_loss.lin{k}.model.1.", "lpips", (f"lin{k}",)) for k in range(5)),
    ("z_dm.", "dm", ()),
    ("z_dm_ema.", "dm_ema", ()),
)
PARTS = ("ae", "disc", "lpips", "dm", "dm_ema")
_DROPPED_LEAVES = ("num_batches_tracked",)  # BN step counters; Flax keeps none.
# Buffers the Flax modules hold as constants: dropped after checking their values.
_CONSTANT_BUFFERS = {
    "perc_loss.scaling_layer.shift": lpips.INPUT_SHIFT,
    "perc_loss.scaling_layer.scale": lpips.INPUT_SCALE,
}
_BATCH_STATS = {"running_mean": "mean", "running_var": "var"}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One torch tensor's destination: part, collection, Flax path and layout change."""
  torch_key: str
  part: str
  collection: str
  path: tuple[str, ...]
  transform: str


def _conv2d(w):
  return np.transpose(w, (2, 3, 1, 0))


def _conv1x1_dense(w):
  return np.transpose(w[:, :, 0, 0])


def _conv1d_dense(w):
  return np.transpose(w[:, :, 0])


def _conv1d(w):
  return np.transpose(w, (2, 1, 0))


_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda w: w, "conv2d": _conv2d, "conv1x1_dense": _conv1x1_dense,
    "conv1d_dense": _conv1d_dense, "conv1d": _conv1d, "linear": np.transpose,
}


def _pick_transform(torch_shape: tuple[int, ...], flax_leaf: str,
                    flax_shape: tuple[int, ...]) -> str | None:
  """The layout change that turns `torch_shape` into `flax_shape`, or None."""
  if flax_leaf != "kernel":
    return "identity"
  candidates = {(4, 4): "conv2d", (4, 2): "conv1x1_dense", (3, 2): "conv1d_dense",
                (3, 3): "conv1d", (2, 2): "linear"}
  name = candidates.get((len(torch_shape), len(flax_shape)))
  if name is None:
    return None
  if name == "conv1x1_dense" and torch_shape[2:] != (1, 1):
    return None
  if name == "conv1d_dense" and torch_shape[2] != 1:
    return None
  return name


def _unboxed_shapes(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: tuple(x.shape), nn.meta.unbox(tree))


def _split_path(parts: list[str], node: Mapping[str, Any]) -> list[tuple[str, ...]]:
  """Every way to group `parts` into "_"-joined names that walk down `node`."""
  if not parts:
    return [()]
  found = []
  for j in range(1, len(parts) + 1):
    name = "_".join(parts[:j])
    child = node.get(name) if isinstance(node, Mapping) else None
    if child is None:
      continue
    if isinstance(child, Mapping):
      found += [(name,) + rest for rest in _split_path(parts[j:], child)]
    elif j == len(parts):
      found.append((name,))
  return found


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for p in path:
    if not isinstance(tree, Mapping) or p not in tree:
      return None
    tree = tree[p]
  return tree


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _destination(key: str, targets: Mapping[str, Mapping[str, PyTree]],
                 prefixes: Prefixes) -> tuple[str, str, tuple[str, ...]] | str:
  """(part, collection, Flax path) of one torch key, or why there is none."""
  prefix = next((p for p in prefixes if key.startswith(p[0])), None)
  if prefix is None or prefix[1] not in targets:
    return "no target part"
  torch_prefix, part, flax_prefix = prefix
  params = targets[part]["params"]
  *mods, leaf = key[len(torch_prefix):].split(".")
  base = _get(params, flax_prefix)
  paths = [flax_prefix + p for p in _split_path(mods, base)] if base is not None else []
  if len(paths) != 1:
    return f"ambiguous Flax paths {paths}" if paths else "no matching Flax module"
  path, collection = paths[0], "params"
  node = _get(params, path)
  if not isinstance(node, Mapping):  # The module path already names a param (embedding).
    dest = path if leaf == "weight" else None
  elif leaf in _BATCH_STATS:
    collection, dest = "batch_stats", path + (_BATCH_STATS[leaf],)
  elif leaf == "weight":
    dest = next((path + (n,) for n in ("kernel", "scale", "embedding") if n in node), None)
  else:
    dest = path + (leaf,) if leaf in node else None
  if dest is None or not isinstance(_get(targets[part].get(collection, {}), dest), tuple):
    return f"no Flax leaf for {leaf!r} under {'/'.join(path)}"
  return part, collection, dest


def plan(torch_shapes: Mapping[str, tuple[int, ...]],
         targets: Mapping[str, Mapping[str, PyTree]],
         prefixes: Prefixes = _PREFIXES) -> list[Entry]:
  """Finds the destination of every torch tensor and checks full, exact coverage.

  Args:
    torch_shapes: state-dict key -> shape.
    targets: part -> collection -> tree of Flax leaf shapes (tuples); keys of
      parts not in `targets` count as unmapped.
    prefixes: (torch key prefix, part, Flax path prefix), the first match wins;
      INFD's by default.

  Returns:
    One Entry per torch key, except BN step counters and constant buffers.

  Raises:
    ConversionError: listing unmapped torch keys, unfilled Flax leaves and shape
      mismatches.
  """
  entries, unmapped, mismatched = [], [], []
  for key, shape in torch_shapes.items():
    shape = tuple(shape)
    if key.rsplit(".", 1)[-1] in _DROPPED_LEAVES or key in _CONSTANT_BUFFERS:
      continue
    dest = _destination(key, targets, prefixes)
    if isinstance(dest, str):
      unmapped.append(f"{key} {shape}: {dest}")
      continue
    part, collection, path = dest
    flax_shape = _get(targets[part][collection], path)
    transform = _pick_transform(shape, path[-1], flax_shape)
    # A zero-stride view gives the transformed shape without allocating.
    out_shape = (None if transform is None else
                 _TRANSFORMS[transform](np.broadcast_to(np.int8(0), shape)).shape)
    if out_shape != flax_shape:
      mismatched.append(f"{key} {shape} -> {part}:{collection}/{'/'.join(path)} {flax_shape}")
      continue
    entries.append(Entry(key, part, collection, path, transform))

  filled = {(e.part, e.collection, e.path) for e in entries}
  unfilled = [f"{part}:{coll}/{'/'.join(path)} {shape}"
              for part, colls in targets.items() for coll, tree in colls.items()
              for path, shape in _flatten(tree).items() if (part, coll, path) not in filled]
  duplicates = len(entries) - len(filled)
  if unmapped or unfilled or mismatched or duplicates:
    raise ConversionError(_report(unmapped, unfilled, mismatched, duplicates))
  return entries


def _report(unmapped, unfilled, mismatched, duplicates, limit: int = 40) -> str:
  lines = ["checkpoint does not match the infd_jax architecture:"]
  for title, items in (("torch keys left unmapped", unmapped),
                       ("Flax leaves not filled", unfilled),
                       ("shape disagreements", mismatched)):
    if items:
      lines.append(f"  {len(items)} {title}:")
      lines += [f"    {s}" for s in items[:limit]]
      if len(items) > limit:
        lines.append(f"    ... and {len(items) - limit} more")
  if duplicates:
    lines.append(f"  {duplicates} Flax leaves targeted by more than one torch key")
  return "\n".join(lines)


def apply(entries: list[Entry], state_dict: Mapping[str, np.ndarray],
          dtype: np.dtype = np.float32) -> dict[str, PyTree]:
  """Builds {part: {collection: nested dict of `dtype` arrays}} from a plan (params and
  stats are float32; float64 keeps float64 tensors, e.g. official gradients, exact)."""
  out: dict[str, Any] = {}
  for e in entries:
    node = out.setdefault(e.part, {}).setdefault(e.collection, {})
    for p in e.path[:-1]:
      node = node.setdefault(p, {})
    value = np.asarray(state_dict[e.torch_key], dtype)
    node[e.path[-1]] = np.ascontiguousarray(_TRANSFORMS[e.transform](value))
  return out


# --------------------------------------------------------------------------
# Target trees (shapes only, via jax.eval_shape) and the whole conversion.


def target_shapes(part: str, kwargs: Mapping[str, Any]) -> dict[str, PyTree]:
  """{collection: tree of leaf shapes} of one part's Flax module, without allocating it."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  static = {}
  if part == "ae":
    s = 2 ** len(kwargs["ch_mult"])
    model = autoencoder.INFDAutoencoder(**kwargs)
    inputs = (f32(1, s, s, 3), f32(1, 4, 4, 2), f32(1, 4, 4, 2))
  elif part == "disc":
    s = 2 ** (kwargs["n_layers"] + 2)
    model = discriminator.PatchDiscriminator(**kwargs)
    inputs, static = (f32(1, s, s, 3),), {"train": False}
  elif part == "lpips":
    model = lpips.LPIPS()
    inputs, static = (f32(1, 32, 32, 3), f32(1, 32, 32, 3)), {"train": False}
  elif part in ("dm", "dm_ema"):
    s = 2 ** len(kwargs["channel_mult"])
    model = unet.UNet(**kwargs)
    inputs = (f32(1, s, s, kwargs["in_channels"]), jax.ShapeDtypeStruct((1,), jnp.int32))
  else:
    raise ValueError(f"unknown part {part!r}")
  init = lambda *x: model.init(jax.random.PRNGKey(0), *x, **static)
  return _unboxed_shapes(jax.eval_shape(init, *inputs))


def parts_present(keys) -> list[str]:
  """Parts with at least one key in the state dict, in `PARTS` order."""
  found = {part for k in keys for p, part, _ in _PREFIXES if k.startswith(p)}
  return [p for p in PARTS if p in found]


def _family(part: str) -> str:
  return "dm" if part == "dm_ema" else part


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: Mapping[str, Any],
                       parts: list[str] | None = None) -> tuple[dict[str, PyTree], dict[str, Any]]:
  """Converts the official state dict to Flax trees.

  Args:
    state_dict: torch key -> array (torch layout).
    model: the checkpoint's 'model' entry without 'sd' needed ({'name', 'args'}).
    parts: subset of `PARTS` to convert (keys of other parts are skipped on
      purpose); None = every part present.

  Returns:
    (trees, arch): trees as in the module docstring ('disc' holds both
    collections, the other parts their params), arch = kwargs per family.
  """
  present = parts_present(state_dict)
  if "ae" not in present:
    raise ConversionError("no autoencoder weights (encoder./decoder./renderer.) found; "
                          "not an INFD checkpoint")
  parts = present if parts is None else [p for p in PARTS if p in parts]
  missing = [p for p in parts if p not in present]
  if missing:
    raise ConversionError(f"requested parts {missing} are not in the checkpoint (has {present})")
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  arch = find_architecture(shapes, model, parts)
  if "lpips" in parts:
    for key, want in _CONSTANT_BUFFERS.items():
      got = np.ravel(state_dict.get(key, want))
      if not np.allclose(got, want, atol=1e-6):
        raise ConversionError(f"{key}={got} differs from the LPIPS constant {want}")
  skipped = [p for p, part, _ in _PREFIXES if part not in parts]
  shapes = {k: v for k, v in shapes.items() if not any(k.startswith(p) for p in skipped)}
  targets = {p: target_shapes(p, arch.get(_family(p), {})) for p in parts}
  trees = apply(plan(shapes, targets), state_dict)
  return {p: trees[p] if p == "disc" else trees[p]["params"] for p in parts}, arch


def param_count(tree: PyTree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------
# Converted checkpoint on disk.


def save_converted(directory: str | os.PathLike, trees: dict[str, PyTree],
                   meta: dict[str, Any]) -> None:
  """Writes DIR/params (orbax) and DIR/meta.json; the directory must not hold params yet."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = paths.absolute(directory)
  directory.mkdir(parents=True, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory / "params", trees)
  ckptr.wait_until_finished()
  (directory / "meta.json").write_text(json.dumps(meta, indent=2, default=str))


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
  """The meta.json of a converted checkpoint; kwargs lists come back as tuples.

  E.g. `INFDAutoencoder(**meta['ae'])`, `PatchDiscriminator(**meta['disc'])`,
  `UNet(**meta['dm'])` (each key present only if that part was converted).
  """
  meta = json.loads((epath.Path(directory) / "meta.json").read_text())
  for family in ("ae", "disc", "dm"):
    if family in meta:
      meta[family] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta[family].items()}
  return meta


def load_converted(directory: str | os.PathLike,
                   abstract: PyTree | None = None) -> dict[str, PyTree]:
  """Restores {part: params} of a converted checkpoint (see the module docstring).

  Args:
    directory: the converter's output DIR.
    abstract: optional target tree of jax.ShapeDtypeStruct (with shardings) for
      all or some parts; None restores every part as host-local arrays.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = paths.absolute(directory) / "params"
  ckptr = ocp.StandardCheckpointer()
  if abstract is None:
    return ckptr.restore(path)
  return ckptr.restore(path, abstract)


def convert_checkpoint(src: str | os.PathLike, directory: str | os.PathLike,
                       parts: list[str] | None = None) -> dict[str, Any]:
  """Reads an official `.pth`, converts it and writes DIR; returns the meta dict."""
  from infd_jax.convert import torch_pickle  # pylint: disable=g-import-not-at-top
  ckpt = torch_pickle.load_torch_state_dict(src)
  if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping) \
      or "sd" not in ckpt["model"]:
    raise ConversionError(f"{src}: expected an INFD trainer checkpoint {{'model': {{'name', "
                          "'args', 'sd'}, ...}}")
  model = ckpt["model"]
  trees, arch = convert_state_dict(model["sd"], model, parts)
  meta = dict(model_name=model.get("name"), model_args=model.get("args"), parts=list(trees),
              iter=ckpt.get("iter"), source=str(paths.absolute(src)),
              param_counts={p: param_count(t) for p, t in trees.items()}, **arch)
  save_converted(directory, trees, meta)
  return meta


def is_converted_checkpoint(directory: str | os.PathLike) -> bool:
  """True if `directory` holds the output of `python -m infd_jax.convert`."""
  path = epath.Path(directory)
  return (path / "meta.json").is_file() and (path / "params").is_dir()
