"""Renames diffusers' and Hugging Face's Stable Diffusion keys into the original layout.

The original (CompVis / Stability single-file) layout is the one `sd_unet`,
`sd_vae` and `clip.text` are named after, so a diffusers folder is first
renamed key by key into it (the inverse of diffusers' single-file readers):

UNet (`model.diffusion_model.` after renaming), with P = layers_per_block + 1:
  down_blocks.i.resnets.j     -> input_blocks.(1 + i P + j).0
  down_blocks.i.attentions.j  -> input_blocks.(1 + i P + j).1
  down_blocks.i.downsamplers.0.conv -> input_blocks.((i + 1) P).0.op
  mid_block.resnets.j / attentions.0 -> middle_block.(2 j) / middle_block.1
  up_blocks.i.resnets.j / attentions.j -> output_blocks.(i P + j).0 / .1
  up_blocks.i.upsamplers.0    -> output_blocks.(i P + P - 1).(2 if the level has
                                 attention else 1)
  inside ResBlocks: norm1, conv1, norm2, conv2, time_emb_proj, conv_shortcut ->
  in_layers.0, in_layers.2, out_layers.0, out_layers.3, emb_layers.1, skip_connection;
  time_embedding.linear_1/2, conv_in, conv_norm_out, conv_out -> time_embed.0/2,
  input_blocks.0.0, out.0, out.2. Transformer internals keep their names.
VAE (`first_stage_model.`), with L levels: down_blocks.i.resnets.j ->
  down.i.block.j, up_blocks.i.resnets.j -> up.(L-1-i).block.j, down/upsamplers.0
  -> down.i.downsample / up.(L-1-i).upsample, mid_block.resnets.j ->
  mid.block_(j+1), mid_block.attentions.0.{group_norm, to_q, to_k, to_v, to_out.0}
  (older diffusers: query, key, value, proj_attn) -> mid.attn_1.{norm, q, k, v,
  proj_out} (Linear weights become 1x1 convs), conv_norm_out -> norm_out,
  conv_shortcut -> nin_shortcut.
Text: Hugging Face `CLIPTextModel` keys (with or without `text_model.`) ->
  OpenCLIP's (`transformer.resblocks.n.attn.in_proj_weight` = q, k, v stacked).

A key that fits no rule is kept unchanged, so the coverage check names it.
"""

import re
from typing import Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_UNET_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|"
                         r"upsamplers)\.(\d+)\.(.+)$")
_MID_BLOCK = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _resnet_inner(rest: str) -> str:
  head, _, tail = rest.partition(".")
  return f"{_RESNET.get(head, head)}.{tail}"


def _unet_key(key: str, per: int, up_attention: Sequence[bool]) -> str:
  head = key.rsplit(".", 1)[0]
  if head in _UNET_TOP:
    return f"{_UNET_TOP[head]}.{key.rsplit('.', 1)[1]}"
  m = _MID_BLOCK.match(key)
  if m:
    kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
    if kind == "resnets":
      return f"middle_block.{2 * j}.{_resnet_inner(rest)}"
    return f"middle_block.1.{rest}"
  m = _UNET_BLOCK.match(key)
  if not m:
    return key
  where, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
  if kind == "resnets":
    index = 1 + i * per + j if where == "down_blocks" else i * per + j
    stage = "input_blocks" if where == "down_blocks" else "output_blocks"
    return f"{stage}.{index}.0.{_resnet_inner(rest)}"
  if kind == "attentions":
    index = 1 + i * per + j if where == "down_blocks" else i * per + j
    stage = "input_blocks" if where == "down_blocks" else "output_blocks"
    return f"{stage}.{index}.1.{rest}"
  if kind == "downsamplers":
    return f"input_blocks.{(i + 1) * per}.0.{rest.replace('conv.', 'op.', 1)}"
  sub = 2 if i < len(up_attention) and up_attention[i] else 1
  return f"output_blocks.{i * per + per - 1}.{sub}.{rest}"


def unet_from_diffusers(sd: Arrays, layers_per_block: int,
                        up_block_types: Sequence[str]) -> dict[str, np.ndarray]:
  """A diffusers UNet2DConditionModel state dict in the original layout (no prefix)."""
  up_attention = ["CrossAttn" in t for t in up_block_types]
  return {_unet_key(k, layers_per_block + 1, up_attention): v for k, v in sd.items()}


def _vae_key(key: str, levels: int) -> tuple[str, bool]:
  """(original key, whether a Linear weight must become a 1x1 conv)."""
  parts = key.split(".")
  if len(parts) > 4 and parts[0] in ("encoder", "decoder") and parts[1] in ("down_blocks",
                                                                             "up_blocks"):
    stage = "down" if parts[1] == "down_blocks" else "up"
    i = int(parts[2]) if stage == "down" else levels - 1 - int(parts[2])
    if parts[3] == "resnets":
      rest = [f"{stage}.{i}.block.{parts[4]}"] + parts[5:]
    else:  # downsamplers.0.conv / upsamplers.0.conv
      rest = [f"{stage}.{i}.{stage}sample"] + parts[5:]
    key = ".".join([parts[0]] + rest)
  elif len(parts) > 4 and parts[0] in ("encoder", "decoder") and parts[1] == "mid_block":
    if parts[2] == "resnets":
      key = ".".join([parts[0], f"mid.block_{int(parts[3]) + 1}"] + parts[4:])
    elif parts[4] in _VAE_ATTN:
      return ".".join([parts[0], "mid.attn_1", _VAE_ATTN[parts[4]], parts[-1]]), True
  key = key.replace("conv_norm_out", "norm_out")
  return key.replace("conv_shortcut", "nin_shortcut"), False


def vae_from_diffusers(sd: Arrays, levels: int) -> dict[str, np.ndarray]:
  """A diffusers AutoencoderKL state dict in the original layout (no prefix)."""
  out = {}
  for key, value in sd.items():
    new, attention = _vae_key(key, levels)
    out[new] = value[:, :, None, None] if attention and np.ndim(value) == 2 else value
  return out


_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_HF_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
_HF_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def text_from_hf(sd: Arrays) -> dict[str, np.ndarray]:
  """A Hugging Face CLIPTextModel state dict in OpenCLIP's layout (no prefix).

  `position_ids` (a derived buffer) is dropped; q/k/v are stacked into in_proj.
  """
  out, qkv = {}, {}
  for key, value in sd.items():
    key = key.removeprefix("text_model.")
    if key == "embeddings.position_ids":
      continue
    m = _HF_LAYER.match(key)
    if key in _HF_TOP:
      out[_HF_TOP[key]] = value
    elif m and re.fullmatch(r"self_attn\.[qkv]_proj\.(weight|bias)", m.group(2)):
      leaf = m.group(2).rsplit(".", 1)[1]
      qkv.setdefault((m.group(1), leaf), {})[m.group(2)[10]] = value
    elif m:
      name, _, leaf = m.group(2).rpartition(".")
      out[f"transformer.resblocks.{m.group(1)}.{_HF_NAMES.get(name, name)}.{leaf}"] = value
    else:
      out[key] = value
  for (layer, leaf), parts in qkv.items():
    if set(parts) != set("qkv"):  # incomplete: left under its own names, reported unknown
      out.update({f"encoder.layers.{layer}.self_attn.{c}_proj.{leaf}": parts[c] for c in parts})
      continue
    out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = np.concatenate(
        [parts[c] for c in "qkv"])
  return out
