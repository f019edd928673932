"""Tests for the official-checkpoint converter: safe .pth reading, key mapping, numerics.

Checkpoints are built without torch by `torch_zip_writer`, with keys and shapes
generated from the REFERENCE.md 10.2 rules below (independently of the converter);
the generator is validated against the entry and parameter counts of REFERENCE.md 3.7.
"""

import collections
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infd_jax.convert import __main__ as cli
from infd_jax.convert import mapping, torch_pickle
from infd_jax.convert.architecture import ConversionError
from infd_jax.models import discriminator, layers
from infd_jax.models import unet as unet_lib
from tests import torch_zip_writer

# ---------------------------------------------------------------------------
# Official state-dict layout (REFERENCE.md 10.2), parameterised by width.


def _conv(sd, key, o, i, k, bias=True):
  sd[f"{key}.weight"] = (o, i, k, k)
  if bias:
    sd[f"{key}.bias"] = (o,)


def _norm(sd, key, c):
  sd[f"{key}.weight"], sd[f"{key}.bias"] = (c,), (c,)


def _vq_resblock(sd, key, cin, cout):
  _norm(sd, f"{key}.norm1", cin)
  _conv(sd, f"{key}.conv1", cout, cin, 3)
  _norm(sd, f"{key}.norm2", cout)
  _conv(sd, f"{key}.conv2", cout, cout, 3)
  if cin != cout:
    _conv(sd, f"{key}.nin_shortcut", cout, cin, 1)


def _vq_mid(sd, key, c):
  _vq_resblock(sd, f"{key}.mid.block_1", c, c)
  _norm(sd, f"{key}.mid.attn_1.norm", c)
  for n in ("q", "k", "v", "proj_out"):
    _conv(sd, f"{key}.mid.attn_1.{n}", c, c, 1)
  _vq_resblock(sd, f"{key}.mid.block_2", c, c)


def ae_shapes(ch=128, ch_mult=(1, 2, 4), nrb=2, z=3, codes=8192, hidden=256, ndf=64,
              n_layers=3, lpips=True):
  """encoder./quantizer./decoder./renderer./perc_loss./disc. key -> torch shape."""
  sd = collections.OrderedDict()
  _conv(sd, "encoder.0.conv_in", ch, 3, 3)
  c = ch
  for lvl, m in enumerate(ch_mult):
    for b in range(nrb):
      _vq_resblock(sd, f"encoder.0.down.{lvl}.block.{b}", c, ch * m)
      c = ch * m
    if lvl != len(ch_mult) - 1:
      _conv(sd, f"encoder.0.down.{lvl}.downsample.conv", c, c, 3)
  _vq_mid(sd, "encoder.0", c)
  _norm(sd, "encoder.0.norm_out", c)
  _conv(sd, "encoder.0.conv_out", z, c, 3)
  _conv(sd, "encoder.1", z, z, 1)
  sd["quantizer.embedding.weight"] = (codes, z)
  _conv(sd, "decoder.0", z, z, 1)
  c = ch * ch_mult[-1]
  _conv(sd, "decoder.1.conv_in", c, z, 3)
  _vq_mid(sd, "decoder.1", c)
  for lvl in reversed(range(len(ch_mult))):
    for b in range(nrb + 1):
      _vq_resblock(sd, f"decoder.1.up.{lvl}.block.{b}", c, ch * ch_mult[lvl])
      c = ch * ch_mult[lvl]
    if lvl:
      _conv(sd, f"decoder.1.up.{lvl}.upsample.conv", c, c, 3)
  _conv(sd, "renderer.net.model.0", hidden, ch * ch_mult[0] + 4, 3)
  for i in (1, 2):
    _vq_resblock(sd, f"renderer.net.model.{i}", hidden, hidden)
  _norm(sd, "renderer.net.norm_out", hidden)
  _conv(sd, "renderer.net.conv_out", 3, hidden, 3)
  if lpips:
    sd["perc_loss.scaling_layer.shift"] = sd["perc_loss.scaling_layer.scale"] = (1, 3, 1, 1)
    c = 3
    for s, idx, o in ((1, 0, 64), (1, 2, 64), (2, 5, 128), (2, 7, 128), (3, 10, 256),
                      (3, 12, 256), (3, 14, 256), (4, 17, 512), (4, 19, 512), (4, 21, 512),
                      (5, 24, 512), (5, 26, 512), (5, 28, 512)):
      _conv(sd, f"perc_loss.net.slice{s}.{idx}", o, c, 3)
      c = o
    for k, o in enumerate((64, 128, 256, 512, 512)):
      sd[f"perc_loss.lin{k}.model.1.weight"] = (1, o, 1, 1)
  _conv(sd, "disc.main.0", ndf, 3, 4)
  idx, c = 2, ndf
  for n in range(1, n_layers + 1):
    f = ndf * min(2 ** n, 8)
    _conv(sd, f"disc.main.{idx}", f, c, 4, bias=False)
    bn = f"disc.main.{idx + 1}"
    _norm(sd, bn, f)
    sd[f"{bn}.running_mean"] = sd[f"{bn}.running_var"] = (f,)
    sd[f"{bn}.num_batches_tracked"] = ()
    idx, c = idx + 3, f
  _conv(sd, f"disc.main.{idx}", 1, c, 4)
  return sd


def _unet_res(sd, key, cin, cout, emb):
  _norm(sd, f"{key}.in_layers.0", cin)
  _conv(sd, f"{key}.in_layers.2", cout, cin, 3)
  sd[f"{key}.emb_layers.1.weight"], sd[f"{key}.emb_layers.1.bias"] = (cout, emb), (cout,)
  _norm(sd, f"{key}.out_layers.0", cout)
  _conv(sd, f"{key}.out_layers.3", cout, cout, 3)
  if cin != cout:
    _conv(sd, f"{key}.skip_connection", cout, cin, 1)


def _unet_attn(sd, key, c):
  _norm(sd, f"{key}.norm", c)
  sd[f"{key}.qkv.weight"], sd[f"{key}.qkv.bias"] = (3 * c, c, 1), (3 * c,)
  sd[f"{key}.proj_out.weight"], sd[f"{key}.proj_out.bias"] = (c, c, 1), (c,)


def unet_shapes(prefix, mc=224, mult=(1, 2, 3, 4), nrb=2, attn=(8, 4, 2)):
  """z_dm./z_dm_ema. key -> torch shape (REFERENCE.md 6.1 structure)."""
  sd = collections.OrderedDict()
  p, emb = prefix, 4 * mc
  sd[f"{p}time_embed.0.weight"], sd[f"{p}time_embed.0.bias"] = (emb, mc), (emb,)
  sd[f"{p}time_embed.2.weight"], sd[f"{p}time_embed.2.bias"] = (emb, emb), (emb,)
  _conv(sd, f"{p}input_blocks.0.0", mc, 3, 3)
  skips, ch, ds, b = [mc], mc, 1, 1
  for lvl, m in enumerate(mult):
    for _ in range(nrb):
      _unet_res(sd, f"{p}input_blocks.{b}.0", ch, m * mc, emb)
      ch = m * mc
      if ds in attn:
        _unet_attn(sd, f"{p}input_blocks.{b}.1", ch)
      skips.append(ch)
      b += 1
    if lvl != len(mult) - 1:
      _conv(sd, f"{p}input_blocks.{b}.0.op", ch, ch, 3)
      skips.append(ch)
      b, ds = b + 1, ds * 2
  _unet_res(sd, f"{p}middle_block.0", ch, ch, emb)
  _unet_attn(sd, f"{p}middle_block.1", ch)
  _unet_res(sd, f"{p}middle_block.2", ch, ch, emb)
  b = 0
  for lvl, m in reversed(list(enumerate(mult))):
    for i in range(nrb + 1):
      _unet_res(sd, f"{p}output_blocks.{b}.0", ch + skips.pop(), m * mc, emb)
      ch, sub = m * mc, 1
      if ds in attn:
        _unet_attn(sd, f"{p}output_blocks.{b}.1", ch)
        sub = 2
      if lvl and i == nrb:
        _conv(sd, f"{p}output_blocks.{b}.{sub}.conv", ch, ch, 3)
        ds //= 2
      b += 1
  _norm(sd, f"{p}out.0", ch)
  _conv(sd, f"{p}out.2", 3, ch, 3)
  return sd


def official_args(codes=8192, feat=128, hidden=256, head_channels=None):
  """The official model args (REFERENCE.md 2.1/2.2); factory defaults are not spelled out."""
  args = dict(
      encoder={"name": "encoder_vqf4"}, z_shape=[3, 64, 64], quantizer=True, n_embed=codes,
      decoder={"name": "decoder_vqf4"},
      renderer={"name": "renderer_concat_wrapper", "args": {
          "z_dec_channels": feat,
          "net": {"name": "simple_renderer_net", "args": {"hidden_channels": hidden}}}},
      loss_cfg={"gan_g_loss": 0.75}, adaptive_gan_weight=True,
      z_dm={"name": "openai_unet"},
      z_dp={"linear_beta_start": 0.0015, "linear_beta_end": 0.0195})
  if head_channels:
    args["z_dm"]["args"] = {"num_head_channels": head_channels}
  return args


_TINY_AE = dict(ch=32, ch_mult=(1, 2), nrb=1, codes=16, hidden=32, ndf=8, n_layers=2, lpips=False)
_TINY_DM = dict(mc=32, mult=(1, 2), nrb=1, attn=(2,))
_TINY_HEAD = 16


def _tiny_shapes():
  return {**ae_shapes(**_TINY_AE), **unet_shapes("z_dm.", **_TINY_DM),
          **unet_shapes("z_dm_ema.", **_TINY_DM)}


def _values(shapes, seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for k, s in shapes.items():
    if k.endswith("num_batches_tracked"):
      sd[k] = np.array(1234, np.int64)
    elif k.endswith("running_var"):
      sd[k] = rng.uniform(0.5, 2.0, s).astype(np.float32)
    else:
      sd[k] = (0.2 * rng.standard_normal(s)).astype(np.float32)
  return sd


def _n(shapes, prefix):
  return sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith(prefix)
             and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
             and "scaling_layer" not in k)


# ---------------------------------------------------------------------------
# torch_pickle


def test_reader_roundtrip_dtypes_views_and_containers(tmp_path):
  rng = np.random.default_rng(1)
  conv = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
  base = np.arange(40, dtype=np.float32)
  obj = {
      "model": {"name": "infd", "args": {"z_shape": [3, 64, 64], "beta": 0.25},
                "sd": collections.OrderedDict(w=conv, n=np.array(7, np.int64))},
      "optimizers": {"enc": {"sd": {"state": {0: {"step": np.array(3.0, np.float32)}},
                                    "param_groups": [{"betas": (0.5, 0.9), "params": [0]}]}}},
      "misc": [None, True, b"raw", "s", np.arange(5, dtype=np.int32),
               np.ones((2, 2), np.float16)],
      # Shared storage: a transposed (non-contiguous) view with an offset, and a slice.
      "t": torch_zip_writer.TensorView(base, 3, (4, 5), (1, 6)),
      "s": torch_zip_writer.TensorView(base, 10, (2, 3), (3, 1)),
  }
  path = tmp_path / "last-model.pth"
  torch_zip_writer.save(obj, path, archive_name="last-model")
  out = torch_pickle.load_torch_state_dict(path)
  np.testing.assert_array_equal(out["model"]["sd"]["w"], conv)
  assert out["model"]["sd"]["w"].dtype == np.float32
  assert out["model"]["sd"]["n"].shape == () and out["model"]["sd"]["n"].dtype == np.int64
  assert int(out["model"]["sd"]["n"]) == 7
  assert out["model"]["args"] == {"z_shape": [3, 64, 64], "beta": 0.25}
  assert out["optimizers"]["enc"]["sd"]["param_groups"][0]["betas"] == (0.5, 0.9)
  assert float(out["optimizers"]["enc"]["sd"]["state"][0]["step"]) == 3.0
  assert out["misc"][:4] == [None, True, b"raw", "s"]
  assert out["misc"][4].dtype == np.int32 and out["misc"][5].dtype == np.float16
  rows, cols = np.meshgrid(np.arange(4), np.arange(5), indexing="ij")
  np.testing.assert_array_equal(out["t"], base[3 + rows * 1 + cols * 6])
  np.testing.assert_array_equal(out["s"], base[10:16].reshape(2, 3))


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


class _Evals:
  def __reduce__(self):
    return eval, ("__import__('os').getcwd()",)


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_reader_rejects_code_execution(tmp_path, payload):
  marker = tmp_path / "pwned"
  evil = _RunsCode(marker) if payload == "system" else _Evals()
  path = tmp_path / "evil.pth"
  data = pickle.dumps({"model": {"sd": {"w": evil}}}, protocol=2)
  torch_zip_writer.save({}, path, pickle_bytes=data)
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="not allowed"):
    torch_pickle.load_torch_state_dict(path)
  assert not marker.exists()


@pytest.mark.parametrize("build_state", [
    # BUILD with slot state on the tensor-rebuild function / a storage type, and dict state.
    b"ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__K\x01\x85s\x86b.",
    b"ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeK\x01s\x86b.",
    b"ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeK\x01sb.",
])
def test_reader_allowed_globals_cannot_be_tampered_with(tmp_path, build_state):
  path = tmp_path / "tamper.pth"
  torch_zip_writer.save({}, path, pickle_bytes=b"\x80\x02" + build_state)
  with pytest.raises(torch_pickle.CheckpointFormatError, match="malformed"):
    torch_pickle.load_torch_state_dict(path)
  good = tmp_path / "good.pth"
  torch_zip_writer.save({"w": np.arange(3, dtype=np.float32)}, good)
  out = torch_pickle.load_torch_state_dict(good)["w"]
  assert out.dtype == np.float32 and out.tolist() == [0.0, 1.0, 2.0]


def test_reader_rejects_out_of_bounds_view_and_legacy_format(tmp_path):
  path = tmp_path / "overrun.pth"
  view = torch_zip_writer.TensorView(np.zeros(6, np.float32), 2, (2, 3), (3, 1))
  torch_zip_writer.save({"t": view}, path)
  with pytest.raises(torch_pickle.CheckpointFormatError, match="overruns"):
    torch_pickle.load_torch_state_dict(path)
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))  # legacy magic number
  with pytest.raises(torch_pickle.CheckpointFormatError, match="legacy"):
    torch_pickle.load_torch_state_dict(legacy)


# ---------------------------------------------------------------------------
# Full-size key coverage (shapes only, eval_shape).


def test_full_size_official_layout_maps_exactly():
  ae = ae_shapes()
  dm, ema = unet_shapes("z_dm."), unet_shapes("z_dm_ema.")
  # The generator reproduces REFERENCE.md 3.7 exactly (entry and parameter counts).
  assert (len(ae), len(dm), len(ema)) == (278, 368, 368)
  counts = {p: _n(ae, p)
            for p in ("encoder", "quantizer", "decoder", "renderer", "perc_loss", "disc")}
  assert counts == dict(encoder=22_337_423, quantizer=24_576, decoder=32_957_068,
                        renderer=2_674_179, perc_loss=14_716_160, disc=2_765_633)
  assert _n(dm, "z_dm.") == 274_056_163
  shapes = {**ae, **dm, **ema}
  parts = mapping.parts_present(shapes)
  assert parts == list(mapping.PARTS)
  arch = mapping.find_architecture(shapes, {"name": "infd", "args": official_args()}, parts)
  assert arch == {
      "ae": dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, num_codes=8192,
                 vq_beta=0.25, renderer_hidden=256, renderer_normalize=True,
                 mid_attention=True),
      "disc": dict(ndf=64, n_layers=3),
      "dm": dict(model_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                 attention_resolutions=(8, 4, 2), num_head_channels=32, in_channels=3,
                 out_channels=3)}
  targets = {p: mapping.target_shapes(p, arch.get("dm" if p == "dm_ema" else p, {}))
             for p in parts}
  entries = mapping.plan(shapes, targets)  # Raises on any unmapped/unfilled/mismatched leaf.
  # A renderer net built with the official `normalize=False` has no GroupNorm weights.
  bare = {k: v for k, v in ae.items() if not (k.startswith("renderer.") and ".norm" in k)}
  bare_ae = mapping.find_architecture(bare, {"name": "infd", "args": official_args()},
                                      ["ae"])["ae"]
  assert bare_ae == {**arch["ae"], "renderer_normalize": False}
  leaves = jax.tree.leaves(mapping.target_shapes("ae", bare_ae)["params"],
                           is_leaf=lambda x: isinstance(x, tuple))
  assert sum(int(np.prod(s)) for s in leaves) == sum(
      _n(bare, p) for p in ("encoder", "quantizer", "decoder", "renderer"))
  dropped = [k for k in shapes if k.endswith("num_batches_tracked") or "scaling_layer" in k]
  assert len(entries) == len(shapes) - len(dropped) == 1014 - 5
  flax_total = sum(int(np.prod(s)) for t in targets.values() for coll in t.values()
                   for s in jax.tree.leaves(coll, is_leaf=lambda x: isinstance(x, tuple)))
  torch_total = sum(int(np.prod(shapes[e.torch_key])) for e in entries)
  assert flax_total == torch_total == 623_587_365 + 1_792  # + BN running mean and var
  by_key = {e.torch_key: e for e in entries}
  assert by_key["z_dm_ema.input_blocks.4.1.qkv.weight"].path == (
      "input_blocks_4_1", "qkv", "kernel")
  assert by_key["disc.main.6.running_var"].collection == "batch_stats"
  assert by_key["perc_loss.lin3.model.1.weight"].path == ("lin3", "kernel")
  assert by_key["encoder.1.weight"].path == ("encoder", "quant_conv", "kernel")


# ---------------------------------------------------------------------------
# Tiny end-to-end conversion through the .pth file and the CLI.


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("convert")
  sd = _values(_tiny_shapes())
  ckpt = {
      "cfg": {"trainer": "infd_trainer", "max_iter": 10},
      "model": {"name": "infd", "args": official_args(16, 32, 32, _TINY_HEAD), "sd": sd},
      "optimizers": {"z_dm": {"name": "adamw", "args": {"lr": 9.6e-5},
                              "sd": {"state": {0: {"exp_avg": np.ones(3, np.float32)}},
                                     "param_groups": [{"lr": 9.6e-5, "params": [0]}]}}},
      "iter": 1234, "train_loader_epoch": 5, "ckpt_select_v": -1.5,
  }
  src = tmp / "last-model.pth"
  torch_zip_writer.save(ckpt, src, archive_name="last-model")
  out = tmp / "converted"
  assert cli.main([f"--input={src}", f"--output={out}"]) == 0
  return sd, mapping.load_converted(out), mapping.load_meta(out), src, tmp


def test_cli_writes_every_part_and_found_config(converted):
  sd, trees, meta, src, tmp = converted
  assert sorted(trees) == ["ae", "disc", "dm", "dm_ema"]
  assert meta["ae"] == dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, num_codes=16,
                            vq_beta=0.25, renderer_hidden=32, renderer_normalize=True,
                            mid_attention=True)
  assert meta["dm"]["num_head_channels"] == _TINY_HEAD and meta["dm"]["channel_mult"] == (1, 2)
  assert meta["iter"] == 1234 and meta["model_args"]["n_embed"] == 16
  # Every torch value lands somewhere: totals agree part by part.
  for part, prefix in (("ae", ("encoder", "quantizer", "decoder", "renderer")),
                       ("dm", ("z_dm.",)), ("dm_ema", ("z_dm_ema.",))):
    torch_n = sum(v.size for k, v in sd.items() if k.startswith(prefix))
    assert mapping.param_count(trees[part]) == torch_n
  np.testing.assert_array_equal(trees["ae"]["quantizer"]["embedding"],
                                sd["quantizer.embedding.weight"])
  np.testing.assert_array_equal(trees["dm_ema"]["out_2"]["bias"], sd["z_dm_ema.out.2.bias"])
  assert not np.array_equal(trees["dm"]["out_2"]["bias"], trees["dm_ema"]["out_2"]["bias"])
  with pytest.raises(SystemExit):  # Refuses to overwrite an existing conversion.
    cli.main([f"--input={src}", f"--output={tmp / 'converted'}"])
  assert cli.main([f"--input={src}", f"--output={tmp / 'subset'}", "--parts=ae,dm_ema"]) == 0
  assert sorted(mapping.load_converted(tmp / "subset")) == ["ae", "dm_ema"]


def _conv_nchw(x, w, b, stride=1, pad=((1, 1), (1, 1))):
  """PyTorch Conv2d in numpy: x [B, I, H, W], w [O, I, kh, kw]."""
  x = np.pad(x, ((0, 0), (0, 0), pad[0], pad[1]))
  o, _, kh, kw = w.shape
  ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  out = np.zeros((x.shape[0], o, ho, wo), np.float64)
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
      out += np.einsum("bihw,oi->bohw", patch, w[:, :, i, j])
  return out + b[None, :, None, None]


def _group_norm_nc(x, w, b, eps, groups=32):
  """PyTorch GroupNorm in numpy: x [B, C, ...], contiguous channel groups."""
  shape = x.shape
  g = x.reshape(shape[0], groups, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
  bshape = (1, -1) + (1,) * (len(shape) - 2)
  return g.reshape(shape) * w.reshape(bshape) + b.reshape(bshape)


def _nhwc(x):
  return jnp.asarray(np.transpose(x, (0, 2, 3, 1)), jnp.float32)


def test_converted_conv_matches_torch_layout(converted):
  sd, trees, *_ = converted
  x = np.random.default_rng(2).standard_normal((2, 64, 6, 5)).astype(np.float32)
  w, b = sd["encoder.0.down.1.block.0.conv1.weight"], sd["encoder.0.down.1.block.0.conv1.bias"]
  layer = layers.conv(64, 3, in_features=32, dtype=jnp.float32)
  params = trees["ae"]["encoder"]["down_1_block_0"]["conv1"]
  # The torch weight is (64, 32, 3, 3); feed the first 32 input channels.
  got = layer.apply({"params": params}, _nhwc(x[:, :32]))
  ref = _conv_nchw(x[:, :32], w, b)
  np.testing.assert_allclose(np.transpose(got, (0, 3, 1, 2)), ref, rtol=1e-4, atol=1e-4)
  # Strided 4x4 conv of the discriminator, no bias.
  w = sd["disc.main.2.weight"]
  layer = layers.conv(16, 4, in_features=8, strides=2, padding=((1, 1), (1, 1)), use_bias=False)
  xd = x[:, :8]
  got = layer.apply({"params": trees["disc"]["params"]["main_2"]}, _nhwc(xd))
  ref = _conv_nchw(xd, w, np.zeros(16), stride=2)
  np.testing.assert_allclose(np.transpose(got, (0, 3, 1, 2)), ref, rtol=1e-4, atol=1e-4)


def test_converted_group_norm_batch_norm_and_linear(converted):
  sd, trees, *_ = converted
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 64, 4, 3)).astype(np.float32) * 3 + 1
  ref = _group_norm_nc(x, sd["encoder.0.norm_out.weight"], sd["encoder.0.norm_out.bias"], 1e-6)
  got = layers.group_norm(1e-6).apply({"params": trees["ae"]["encoder"]["norm_out"]}, _nhwc(x))
  np.testing.assert_allclose(np.transpose(got, (0, 3, 1, 2)), ref, rtol=1e-4, atol=1e-4)

  bn = "disc.main.3"
  xb = x[:, :16]
  ref = ((xb - sd[f"{bn}.running_mean"][None, :, None, None])
         / np.sqrt(sd[f"{bn}.running_var"][None, :, None, None] + 1e-5)
         * sd[f"{bn}.weight"][None, :, None, None] + sd[f"{bn}.bias"][None, :, None, None])
  variables = {c: trees["disc"][c]["main_3"] for c in ("params", "batch_stats")}
  got = discriminator.BatchNorm().apply(variables, _nhwc(xb), train=False)
  np.testing.assert_allclose(np.transpose(got, (0, 3, 1, 2)), ref, rtol=1e-4, atol=1e-4)

  e = rng.standard_normal((2, 32)).astype(np.float32)
  ref = e @ sd["z_dm.time_embed.0.weight"].T + sd["z_dm.time_embed.0.bias"]
  got = layers.dense(128, in_features=32).apply({"params": trees["dm"]["time_embed_0"]}, e)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _legacy_attention_nct(x, sd, key, head_channels):
  """The official legacy-QKV AttentionBlock in numpy on torch-layout weights, x [B, C, T]."""
  b, c, t = x.shape
  h = _group_norm_nc(x, sd[f"{key}.norm.weight"], sd[f"{key}.norm.bias"], 1e-5)
  qkv = (np.einsum("oi,bit->bot", sd[f"{key}.qkv.weight"][:, :, 0], h)
         + sd[f"{key}.qkv.bias"][None, :, None])
  heads = c // head_channels
  q, k, v = np.split(qkv.reshape(b * heads, 3 * head_channels, t), 3, axis=1)
  scale = 1 / np.sqrt(np.sqrt(head_channels))
  logits = np.einsum("bct,bcs->bts", q * scale, k * scale)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = np.einsum("bts,bcs->bct", w, v).reshape(b, c, t)
  out = np.einsum("oi,bit->bot", sd[f"{key}.proj_out.weight"][:, :, 0], a)
  return x + out + sd[f"{key}.proj_out.bias"][None, :, None]


def test_converted_unet_attention_matches_legacy_qkv(converted):
  sd, trees, *_ = converted
  x = np.random.default_rng(4).standard_normal((2, 64, 3, 4)).astype(np.float32)
  ref = _legacy_attention_nct(x.reshape(2, 64, 12), sd, "z_dm.input_blocks.3.1", _TINY_HEAD)
  block = unet_lib.AttentionBlock(num_head_channels=_TINY_HEAD)
  got = block.apply({"params": trees["dm"]["input_blocks_3_1"]}, _nhwc(x))
  np.testing.assert_allclose(np.transpose(got, (0, 3, 1, 2)).reshape(2, 64, 12), ref,
                             rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Refusals with clear messages.


def _tiny_targets(shapes):
  arch = mapping.find_architecture(shapes, {"name": "infd", "args": official_args(16, 32, 32, 16)},
                                   mapping.parts_present(shapes))
  return {p: mapping.target_shapes(p, arch.get("dm" if p == "dm_ema" else p, {}))
          for p in mapping.parts_present(shapes)}


def test_plan_reports_extra_missing_and_misshaped_keys():
  shapes = dict(_tiny_shapes())
  targets = _tiny_targets(shapes)
  assert len(mapping.plan(shapes, targets)) == len(shapes) - 2  # two num_batches_tracked
  shapes["encoder.0.mid.attn_1.bogus.weight"] = (64, 64, 1, 1)
  shapes["vae.conv.weight"] = (3, 3, 1, 1)
  del shapes["decoder.1.conv_in.bias"]
  shapes["renderer.net.conv_out.weight"] = (3, 32, 1, 1)
  with pytest.raises(ConversionError) as err:
    mapping.plan(shapes, targets)
  msg = str(err.value)
  assert "2 torch keys left unmapped" in msg and "encoder.0.mid.attn_1.bogus.weight" in msg
  assert "vae.conv.weight" in msg
  assert "ae:params/decoder/conv_in/bias" in msg
  assert ("renderer.net.conv_out.weight (3, 32, 1, 1) -> "
          "ae:params/renderer/conv_out/kernel (3, 3, 32, 3)") in msg


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(name="ldm"), "only 'infd'"),
    (lambda m: m["args"]["renderer"].update(name="renderer_fixres_wrapper"), "oritail"),
    (lambda m: m["args"]["z_dm"]["args"].update(use_scale_shift_norm=True), "use_scale_shift_norm"),
    (lambda m: m["args"].update(n_embed=8192), "n_embed"),
])
def test_other_architectures_are_refused(change, match):
  model = {"name": "infd", "args": official_args(16, 32, 32, 16)}
  change(model)
  sd = {k: np.zeros(s, np.float32) for k, s in ae_shapes(**_TINY_AE).items()}
  sd.update({k: np.zeros(s, np.float32) for k, s in unet_shapes("z_dm.", **_TINY_DM).items()})
  with pytest.raises(ConversionError, match=match):
    mapping.convert_state_dict(sd, model)


def test_lpips_scaling_buffers_must_match_constants():
  sd = {k: np.zeros(s, np.float32) for k, s in ae_shapes(**{**_TINY_AE, "lpips": True}).items()}
  with pytest.raises(ConversionError, match="scaling_layer"):
    mapping.convert_state_dict(sd, {"name": "infd", "args": official_args(16, 32, 32)})



def test_converted_checkpoint_samples_through_the_generation_job(converted, tmp_path):
  """Official layout -> convert -> `--config.stage=sample` writes images."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from infd_jax import checks, jobs  # pylint: disable=g-import-not-at-top
  _, _, meta, _, tmp = converted
  config = tiny.get_config()
  config.stage = "sample"
  config.ae.update(**meta["ae"])
  config.dm.update(**{k: v for k, v in meta["dm"].items() if k in config.dm})
  config.ckpt.update(ae_checkpoint=str(tmp / "converted"), dm_checkpoint=str(tmp / "converted"))
  config.sample.update(num_samples=2, batch_size=2, sizes=(32,))
  jobs.run(config, tmp_path)
  assert sorted(p.name for p in (tmp_path / "samples" / "32").glob("*.png")) == ["0.png", "1.png"]
  config.ae.num_codes = 8  # as --config.ae.num_codes=8 on the command line
  with pytest.raises(checks.UserError, match=r"ae.num_codes=8 contradicts .*\(ae.num_codes=16\)"):
    jobs.run(config, tmp_path / "mismatch", overrides=["ae.num_codes"])


def test_converted_checkpoint_metadata_is_read_from_gs():
  """A converted checkpoint under `gs://` (an in-memory gcs filesystem) is recognised and its
  meta.json read remotely (kwargs lists back as tuples)."""
  import json  # pylint: disable=g-import-not-at-top
  from tests import fake_gcs  # pylint: disable=g-import-not-at-top
  meta = {"parts": ["ae"], "ae": {"ch": 32, "ch_mult": [1, 2]}}
  with fake_gcs.installed() as fs:
    assert not mapping.is_converted_checkpoint("gs://bucket/converted")
    fs().pipe("gs://bucket/converted/meta.json", json.dumps(meta).encode())
    fs().pipe("gs://bucket/converted/params/_METADATA", b"{}")
    assert mapping.is_converted_checkpoint("gs://bucket/converted")
    assert mapping.load_meta("gs://bucket/converted")["ae"] == {"ch": 32, "ch_mult": (1, 2)}
