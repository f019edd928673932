"""Converts OpenAI CLIP and OpenCLIP checkpoints to `infd_jax.clip.model.CLIP` parameters.

Formats (nothing pickled is ever executed):
  * OpenAI's released `ViT-B-32.pt` etc. are TorchScript archives: `data.pkl`
    pickles the scripted module tree (each module an object whose state is its
    attributes). `torch_pickle` reads it with script objects allowed as inert
    records; the tensors found at attribute paths form the state dict.
  * OpenCLIP's `open_clip_model.safetensors` (read here from its JSON header
    and raw buffers) and `open_clip_pytorch_model.bin` / training checkpoints
    (a `torch.save` zip, optionally under `state_dict` with `module.` prefixes).

Both use OpenAI's key names. Every key must match a rule of `_RULES`; the only
keys dropped are the derived `attn_mask` buffers and OpenAI's three integer
metadata entries. Unknown keys, unfilled parameters and shape mismatches stop
the conversion with their names. The architecture is read from the shapes
(heads = width / head_width); the activation is not in the weights: OpenAI's
models and OpenCLIP's `*-quickgelu` use QuickGELU.

Output: `<out>/params.npz` ('/'-joined Flax paths, float32) and `<out>/config.json`.

    python -m infd_jax.clip.convert --input=ViT-B-32.pt --output=clip/ViT-B-32
"""

import dataclasses
import io
import json
import re
import struct
import zipfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from infd_jax.clip.model import CLIP, CLIPConfig
from infd_jax.convert import torch_pickle

PyTree = Any


class ConversionError(ValueError):
  """The checkpoint does not map onto the CLIP module; the message names every key."""


_T = lambda w: w.T
_BLOCK = {
    "ln_1.weight": ("ln_1/scale", None), "ln_1.bias": ("ln_1/bias", None),
    "ln_2.weight": ("ln_2/scale", None), "ln_2.bias": ("ln_2/bias", None),
    "attn.in_proj_weight": ("attn/in_proj/kernel", _T), "attn.in_proj_bias": ("attn/in_proj/bias", None),
    "attn.out_proj.weight": ("attn/out_proj/kernel", _T),
    "attn.out_proj.bias": ("attn/out_proj/bias", None),
    "mlp.c_fc.weight": ("c_fc/kernel", _T), "mlp.c_fc.bias": ("c_fc/bias", None),
    "mlp.c_proj.weight": ("c_proj/kernel", _T), "mlp.c_proj.bias": ("c_proj/bias", None),
}
_TOP = {
    "visual.conv1.weight": ("visual/conv1/kernel", lambda w: w.transpose(2, 3, 1, 0)),
    "visual.class_embedding": ("visual/class_embedding", None),
    "visual.positional_embedding": ("visual/positional_embedding", None),
    "visual.ln_pre.weight": ("visual/ln_pre/scale", None),
    "visual.ln_pre.bias": ("visual/ln_pre/bias", None),
    "visual.ln_post.weight": ("visual/ln_post/scale", None),
    "visual.ln_post.bias": ("visual/ln_post/bias", None),
    "visual.proj": ("visual/proj", None),
    "token_embedding.weight": ("token_embedding/embedding", None),
    "positional_embedding": ("positional_embedding", None),
    "ln_final.weight": ("ln_final/scale", None), "ln_final.bias": ("ln_final/bias", None),
    "text_projection": ("text_projection", None),
    "logit_scale": ("logit_scale", None),
}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_DROPPED = re.compile(r"^(input_resolution|context_length|vocab_size|(.+\.)?attn_mask)$")


def flax_rule(key: str) -> tuple[str, Callable[[np.ndarray], np.ndarray] | None] | None:
  if key in _TOP:
    return _TOP[key]
  m = _RESBLOCK.match(key)
  if m and m.group(3) in _BLOCK:
    path, fn = _BLOCK[m.group(3)]
    return f"{'visual/' if m.group(1) else ''}transformer/resblocks_{m.group(2)}/{path}", fn
  return None


def read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors file (8-byte header size, JSON header, raw data)."""
  dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
            "I32": np.int32, "BF16": "bfloat16"}
  raw = path.read_bytes()
  (size,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + size])
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ConversionError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    dtype = np.dtype(jnp.bfloat16) if dtypes[info["dtype"]] == "bfloat16" else np.dtype(
        dtypes[info["dtype"]])
    out[key] = np.frombuffer(raw, dtype.newbyteorder("<"), (end - begin) // dtype.itemsize,
                             8 + size + begin).reshape(info["shape"])
  return out


def _flatten_script(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Tensors at the attribute paths of an unpickled TorchScript module tree."""
  out = {}
  for name, value in torch_pickle.script_object_state(obj).items():
    if isinstance(value, np.ndarray):
      out[prefix + name] = value
    elif torch_pickle.script_object_state(value) is not None:
      out.update(_flatten_script(value, f"{prefix}{name}."))
  return out


def read_state_dict(path: str | epath.PathLike) -> tuple[dict[str, np.ndarray], bool]:
  """(tensors, is_torchscript) of an OpenAI TorchScript archive, a safetensors or a torch.save zip."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"CLIP checkpoint {path} not found")
  if path.suffix == ".safetensors":
    return read_safetensors(path), False
  if not zipfile.is_zipfile(path):
    raise ConversionError(f"{path} is neither safetensors nor a PyTorch zip archive")
  with zipfile.ZipFile(path) as z:
    is_script = any(n.endswith("/constants.pkl") for n in z.namelist())
  if is_script:
    return _flatten_script(torch_pickle.load_torch_state_dict(path, torchscript=True)), True
  sd = torch_pickle.load_torch_state_dict(path)
  sd = sd.get("state_dict", sd)
  return {k.removeprefix("module."): v for k, v in sd.items()}, False


def find_config(sd: dict[str, np.ndarray], quick_gelu: bool, head_width: int = 64) -> CLIPConfig:
  """The architecture from the shapes (as OpenAI's `build_model`)."""
  try:
    count = lambda p: len({k[len(p):].split(".")[0] for k in sd if k.startswith(p)})
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1], image_size=patch * grid, patch_size=patch,
        vision_width=width, vision_layers=count("visual.transformer.resblocks."),
        vision_heads=width // head_width, context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0], text_width=text_width,
        text_heads=text_width // head_width, text_layers=count("transformer.resblocks."),
        quick_gelu=quick_gelu)
  except KeyError as e:
    raise ConversionError(f"not a CLIP ViT checkpoint: no {e.args[0]}") from None


def to_flax(sd: dict[str, np.ndarray], config: CLIPConfig) -> PyTree:
  """Maps every key onto the CLIP params tree (float32); raises listing every problem."""
  model = CLIP(**dataclasses.asdict(config))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, config.image_size, config.image_size, 3)),
                          jnp.zeros((1, config.context_length), jnp.int32))["params"]
  wanted = {"/".join(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  flat, unknown, bad_shape = {}, [], []
  for key, value in sd.items():
    if _DROPPED.match(key):
      continue
    rule = flax_rule(key)
    if rule is None or rule[0] not in wanted:
      unknown.append(key)
      continue
    value = np.asarray(value, np.float32)
    value = np.array(rule[1](value) if rule[1] else value)  # contiguous, 0-d stays 0-d
    if value.shape != wanted[rule[0]]:
      bad_shape.append(f"{key} {value.shape} vs {rule[0]} {wanted[rule[0]]}")
    flat[rule[0]] = value
  missing = sorted(set(wanted) - set(flat))
  if unknown or missing or bad_shape:
    raise ConversionError("; ".join(
        f"{what}: {', '.join(items)}" for what, items in
        (("unknown keys", sorted(unknown)), ("missing parameters", missing),
         ("shape mismatches", bad_shape)) if items))
  return unflatten(flat)


def unflatten(flat: dict[str, np.ndarray]) -> PyTree:
  tree: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def save(out_dir: str | epath.PathLike, config: CLIPConfig, params: PyTree) -> None:
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  flat = {"/".join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  (out / "params.npz").write_bytes(buffer.getvalue())
  (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))


def load(converted_dir: str | epath.PathLike) -> tuple[CLIPConfig, PyTree]:
  """(architecture, params) of a converted checkpoint: `CLIP(**asdict(config))`."""
  d = epath.Path(converted_dir)
  if not (d / "config.json").exists():
    raise FileNotFoundError(f"{d} is not a converted CLIP checkpoint (no config.json); "
                            "run python -m infd_jax.clip.convert")
  config = CLIPConfig(**json.loads((d / "config.json").read_text()))
  with np.load(io.BytesIO((d / "params.npz").read_bytes())) as f:
    return config, unflatten({k: f[k] for k in f.files})


def convert(input_path: str | epath.PathLike, output: str | epath.PathLike | None = None, *,
            quick_gelu: bool | None = None, head_width: int = 64) -> tuple[CLIPConfig, PyTree]:
  """Reads a checkpoint, maps it, optionally saves it; quick_gelu None = OpenAI archive only."""
  sd, is_openai = read_state_dict(input_path)
  config = find_config(sd, is_openai if quick_gelu is None else quick_gelu, head_width)
  params = to_flax(sd, config)
  if output is not None:
    save(output, config, params)
  return config, params


def main(argv: list[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m infd_jax.clip.convert", description=__doc__.split(
      "\n")[0])
  p.add_argument("--input", required=True, help="OpenAI .pt, OpenCLIP .safetensors or .bin")
  p.add_argument("--output", required=True, help="output folder")
  p.add_argument("--quick_gelu", choices=("auto", "true", "false"), default="auto",
                 help="auto: QuickGELU for OpenAI archives only (use true for *-quickgelu)")
  p.add_argument("--head_width", type=int, default=64)
  args = p.parse_args(argv)
  try:
    config, _ = convert(args.input, args.output, head_width=args.head_width,
                        quick_gelu=None if args.quick_gelu == "auto" else args.quick_gelu == "true")
  except (FileNotFoundError, ConversionError, torch_pickle.CheckpointFormatError,
          torch_pickle.UnsafeCheckpointError) as e:
    print(f"infd_jax.clip.convert: error: {e}")
    return 2
  print(f"converted {args.input} -> {args.output}: {config}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
