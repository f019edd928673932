"""Reads the INFD architecture (constructor kwargs) from an official state dict.

The official args mostly name factory defaults (`encoder_vqf4`, `openai_unet`),
so widths, depths and attention placement are read from the weight shapes and
cross-checked against whatever the args do state. Anything outside the
supported family (another model, renderer, UNet variant) raises ConversionError.
"""

import json
import re
from typing import Any, Mapping

import numpy as np


class ConversionError(ValueError):
  """The checkpoint does not fit the infd_jax architecture (details in the message)."""


_OFFICIAL_NAMES = {
    ("encoder", "name"): "encoder_vqf4", ("decoder", "name"): "decoder_vqf4",
    ("renderer", "name"): "renderer_concat_wrapper",
    ("renderer", "args", "net", "name"): "simple_renderer_net",
    ("z_dm", "name"): "openai_unet",
}


def _indices(shapes: Mapping[str, Any], pattern: str) -> list[int]:
  """Sorted distinct integers captured by `pattern` (one group) over the keys."""
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in shapes if (m := rx.fullmatch(k))})


def _need(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
  if key not in shapes:
    raise ConversionError(f"not an INFD checkpoint of the supported family: missing {key}")
  return tuple(shapes[key])


def _arg(args: Mapping[str, Any], *path: str) -> Any:
  for p in path:
    if not isinstance(args, Mapping) or p not in args:
      return None
    args = args[p]
  return args


def check_model_spec(model: Mapping[str, Any]) -> None:
  """Refuses checkpoints whose official model spec is not the INFD/CLIF/ADM family."""
  if model.get("name") != "infd":
    raise ConversionError(f"model name is {model.get('name')!r}, only 'infd' is supported")
  args = model.get("args") or {}
  for path, want in _OFFICIAL_NAMES.items():
    got = _arg(args, *path)
    if got is not None and got != want:
      raise ConversionError(f"model arg {'.'.join(path)} is {got!r}; only {want!r} is supported "
                            "(e.g. the fixed-resolution `ae-d4vq-oritail` variant is not)")
  if _arg(args, "renderer", "name") is None:
    raise ConversionError("model args name no renderer; expected renderer_concat_wrapper")


def infer_ae(shapes: Mapping[str, tuple[int, ...]], args: Mapping[str, Any]) -> dict[str, Any]:
  """INFDAutoencoder kwargs from the `encoder./quantizer./renderer.` weights."""
  ch = _need(shapes, "encoder.0.conv_in.weight")[0]
  levels = _indices(shapes, r"encoder\.0\.down\.(\d+)\..*")
  mult = tuple(_need(shapes, f"encoder.0.down.{l}.block.0.conv1.weight")[0] // ch for l in levels)
  blocks = _indices(shapes, r"encoder\.0\.down\.0\.block\.(\d+)\..*")
  kwargs = dict(
      ch=ch, ch_mult=mult, num_res_blocks=len(blocks),
      z_channels=_need(shapes, "encoder.1.weight")[0],
      num_codes=shapes.get("quantizer.embedding.weight", (0,))[0],  # 0: quantizer=False
      vq_beta=float(args.get("vq_beta", 0.25)),
      renderer_hidden=_need(shapes, "renderer.net.model.0.weight")[0],
      renderer_normalize="renderer.net.norm_out.weight" in shapes,  # the net's `normalize`
      mid_attention="encoder.0.mid.attn_1.q.weight" in shapes)  # attn_type "none": no attn_1
  checks = {  # official arg -> the value the weights imply
      ("n_embed",): kwargs["num_codes"],
      ("renderer", "args", "z_dec_channels"): ch * mult[0],
      ("renderer", "args", "net", "args", "hidden_channels"): kwargs["renderer_hidden"],
  }
  z_shape = _arg(args, "z_shape")
  if z_shape is not None:
    checks[("z_shape",)] = [kwargs["z_channels"], *z_shape[1:]]
  for path, implied in checks.items():
    got = _arg(args, *path)
    if got is not None and list(np.atleast_1d(got)) != list(np.atleast_1d(implied)):
      raise ConversionError(f"model arg {'.'.join(path)}={got!r} disagrees with the weights "
                            f"({implied!r})")
  for path in (("z_gaussian",), ("renderer", "args", "co_pe_dim"),
               ("renderer", "args", "ce_pe_dim"), ("renderer", "args", "x_channels")):
    if _arg(args, *path):
      raise ConversionError(f"model arg {'.'.join(path)}={_arg(args, *path)!r} is not supported")
  return kwargs


def infer_disc(shapes: Mapping[str, tuple[int, ...]], args: Mapping[str, Any]) -> dict[str, Any]:
  """PatchDiscriminator kwargs: ndf from the first conv, n_layers from the conv count."""
  for k in ("disc_cond_scale", "disc_use_custom"):
    if args.get(k):
      raise ConversionError(f"model arg {k}={args[k]!r} is not supported")
  convs = [i for i in _indices(shapes, r"disc\.main\.(\d+)\.weight")
           if len(shapes[f"disc.main.{i}.weight"]) == 4]
  return dict(ndf=_need(shapes, "disc.main.0.weight")[0], n_layers=len(convs) - 2)


def infer_unet(shapes: Mapping[str, tuple[int, ...]], prefix: str,
               args: Mapping[str, Any]) -> dict[str, Any]:
  """UNet kwargs from the `z_dm.` weights; the head width comes from the args (default 32)."""
  mc, cin = _need(shapes, f"{prefix}input_blocks.0.0.weight")[:2]
  blocks = _indices(shapes, rf"{re.escape(prefix)}input_blocks\.(\d+)\..*")
  mult, attn, per_level, ds, level_blocks = [], [], [], 1, 0
  for b in blocks[1:]:
    if f"{prefix}input_blocks.{b}.0.op.weight" in shapes:  # Downsample closes a level.
      per_level.append(level_blocks)
      level_blocks, ds = 0, ds * 2
      continue
    out = _need(shapes, f"{prefix}input_blocks.{b}.0.in_layers.2.weight")[0]
    if level_blocks == 0:
      mult.append(out // mc)
    if f"{prefix}input_blocks.{b}.1.qkv.weight" in shapes and ds not in attn:
      attn.append(ds)
    level_blocks += 1
  per_level.append(level_blocks)
  if len(set(per_level)) != 1:
    raise ConversionError(f"UNet levels have different block counts {per_level}")
  unet_args = _arg(args, "z_dm", "args") or {}
  kwargs = dict(model_channels=mc, channel_mult=tuple(mult), num_res_blocks=per_level[0],
                attention_resolutions=tuple(sorted(attn, reverse=True)),
                num_head_channels=int(unet_args.get("num_head_channels", 32)),
                in_channels=cin, out_channels=_need(shapes, f"{prefix}out.2.weight")[0])
  for k in ("model_channels", "num_res_blocks", "in_channels", "out_channels"):
    if k in unet_args and unet_args[k] != kwargs[k]:
      raise ConversionError(
          f"z_dm arg {k}={unet_args[k]!r} disagrees with the weights ({kwargs[k]})")
  for k, want in (("use_scale_shift_norm", False), ("resblock_updown", False),
                  ("use_new_attention_order", False), ("use_spatial_transformer", False)):
    if unet_args.get(k, want) != want:
      raise ConversionError(f"z_dm arg {k}={unet_args[k]!r} is not supported")
  return kwargs


def find_architecture(shapes: Mapping[str, tuple[int, ...]], model: Mapping[str, Any],
                      parts: list[str]) -> dict[str, Any]:
  """Constructor kwargs per model family ('ae', 'disc', 'dm') for the given parts."""
  check_model_spec(model)
  args = model.get("args") or {}
  found = {"ae": infer_ae(shapes, args)} if "ae" in parts else {}
  if "disc" in parts:
    found["disc"] = infer_disc(shapes, args)
  dms = {p: infer_unet(shapes, "z_dm." if p == "dm" else "z_dm_ema.", args)
         for p in ("dm", "dm_ema") if p in parts}
  if len({json.dumps(v, sort_keys=True) for v in dms.values()}) > 1:
    raise ConversionError(f"z_dm and z_dm_ema architectures differ: {dms}")
  if dms:
    found["dm"] = next(iter(dms.values()))
  return found
