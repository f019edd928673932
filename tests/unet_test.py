"""Tests for the ADM UNet: size, key layout, wiring, attention layout and embeddings."""

import math

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infd_jax.models import unet as unet_lib

_TINY = dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(2,), num_head_channels=32)


def _randomize(params, seed, scale=0.1):
  """Replaces every leaf by N(0, scale^2) so zero-init layers cannot hide wiring bugs."""
  rng = np.random.default_rng(seed)  # numpy: no per-shape compilations
  return jax.tree.map(lambda l: jnp.asarray(scale * rng.normal(size=l.shape), l.dtype), params)


def _group_norm_nct(x, scale, bias, groups=32, eps=1e-5):
  b, c, t = x.shape
  g = x.reshape(b, groups, c // groups * t)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
  return g.reshape(b, c, t) * scale[None, :, None] + bias[None, :, None]


def _legacy_attention_nct(x, p, heads):
  """numpy version of the PyTorch legacy block on [B, C, T] with torch-layout weights."""
  b, c, t = x.shape
  h = _group_norm_nct(x, p["norm_w"], p["norm_b"])
  qkv = np.einsum("oc,bct->bot", p["qkv_w"], h) + p["qkv_b"][None, :, None]
  ch = c // heads
  qkv = qkv.reshape(b * heads, 3 * ch, t)
  q, k, v = qkv[:, :ch], qkv[:, ch:2 * ch], qkv[:, 2 * ch:]
  s = ch ** -0.25
  w = np.einsum("bct,bcs->bts", q * s, k * s)
  w = np.exp(w - w.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  a = np.einsum("bts,bcs->bct", w, v).reshape(b, c, t)
  return x + np.einsum("oc,bct->bot", p["proj_w"], a) + p["proj_b"][None, :, None]


class UNetSizeTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    shapes = jax.eval_shape(unet_lib.UNet().init, jax.random.key(0),
                            jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,), jnp.int32))
    cls.params = nn.unbox(shapes["params"])

  def test_parameter_count(self):
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(self.params))
    self.assertEqual(count, 274_056_163)

  def test_module_names_follow_pytorch_keys(self):
    expected = {"time_embed_0", "time_embed_2", "out_0", "out_2",
                "middle_block_0", "middle_block_1", "middle_block_2"}
    expected |= {f"input_blocks_{i}_0" for i in range(12)}
    expected |= {f"input_blocks_{i}_1" for i in (4, 5, 7, 8, 10, 11)}
    expected |= {f"output_blocks_{i}_0" for i in range(12)}
    expected |= {f"output_blocks_{i}_1" for i in range(9)}
    expected |= {f"output_blocks_{i}_2" for i in (2, 5, 8)}
    self.assertEqual(set(self.params), expected)
    with_skip = {k for k, v in self.params.items() if "skip_connection" in v}
    self.assertEqual(with_skip, {"input_blocks_4_0", "input_blocks_7_0", "input_blocks_10_0"}
                     | {f"output_blocks_{i}_0" for i in range(12)})

  def test_shapes_are_transposed_pytorch_shapes(self):
    p = self.params
    # (Flax path, PyTorch shape, transposition) per REFERENCE.md 10.2/10.3.
    conv = (2, 3, 1, 0)
    cases = [
        (p["time_embed_0"]["kernel"], (896, 224), (1, 0)),
        (p["time_embed_2"]["kernel"], (896, 896), (1, 0)),
        (p["input_blocks_0_0"]["kernel"], (224, 3, 3, 3), conv),
        (p["input_blocks_3_0"]["op"]["kernel"], (224, 224, 3, 3), conv),
        (p["input_blocks_4_0"]["skip_connection"]["kernel"], (448, 224, 1, 1), conv),
        (p["input_blocks_4_0"]["emb_layers_1"]["kernel"], (448, 896), (1, 0)),
        (p["input_blocks_4_1"]["qkv"]["kernel"], (1344, 448), (1, 0)),
        (p["input_blocks_4_1"]["proj_out"]["kernel"], (448, 448), (1, 0)),
        (p["output_blocks_0_0"]["in_layers_2"]["kernel"], (896, 1792, 3, 3), conv),
        (p["output_blocks_2_0"]["in_layers_0"]["scale"], (1568,), (0,)),
        (p["output_blocks_2_2"]["conv"]["kernel"], (896, 896, 3, 3), conv),
        (p["output_blocks_9_0"]["in_layers_2"]["kernel"], (224, 672, 3, 3), conv),
        (p["out_2"]["kernel"], (3, 224, 3, 3), conv),
    ]
    for leaf, torch_shape, perm in cases:
      self.assertEqual(leaf.shape, tuple(torch_shape[i] for i in perm))

  def test_remat_keeps_parameter_names(self):
    shapes = jax.eval_shape(unet_lib.UNet(remat=True, **_TINY).init, jax.random.key(0),
                            jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32))
    plain = jax.eval_shape(unet_lib.UNet(**_TINY).init, jax.random.key(0),
                           jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,), jnp.int32))
    self.assertEqual(jax.tree.structure(shapes), jax.tree.structure(plain))


class TinyUNetTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = unet_lib.UNet(**_TINY)
    cls.x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    cls.t = jnp.array([0, 999])
    cls.params = nn.unbox(jax.jit(cls.model.init)(jax.random.key(0), cls.x, cls.t))
    cls.apply = staticmethod(jax.jit(cls.model.apply))

  def test_output_is_zero_at_init_and_not_after(self):
    out = self.apply(self.params, self.x, self.t)
    self.assertEqual(out.shape, (2, 16, 16, 3))
    self.assertEqual(out.dtype, jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    params = _randomize(self.params, 2)
    out = np.asarray(self.apply(params, self.x, self.t))
    self.assertTrue(np.all(np.isfinite(out)))
    self.assertGreater(np.abs(out).mean(), 1e-3)
    # The timestep must matter.
    self.assertGreater(np.abs(out[0] - out[1]).mean(), 1e-4)

  def test_bf16_compute_tracks_float32(self):
    params = _randomize(self.params, 3)
    ref = np.asarray(self.apply(params, self.x, self.t))
    bf16 = unet_lib.UNet(dtype=jnp.bfloat16, **_TINY)
    out = jax.jit(bf16.apply)(params, self.x, self.t)
    self.assertEqual(out.dtype, jnp.float32)
    err = np.abs(np.asarray(out) - ref).mean() / np.abs(ref).mean()
    self.assertLess(err, 0.05)

  def test_output_blocks_concatenate_h_then_skip(self):
    params = _randomize(self.params, 4)

    @jax.jit
    def run(params):
      outs, ins = {}, {}

      def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod.parent, unet_lib.UNet):
          ins[mod.name], outs[mod.name] = args[0], y
        return y

      with nn.intercept_methods(record):
        self.model.apply(params, self.x, self.t)
      return ins, outs

    ins, outs = jax.tree.map(np.asarray, run(params))
    # Tiny layout: in 0 conv, 1 res, 2 down, 3 res+attn; out 0 res+attn,
    # 1 res+attn+up, 2 res, 3 res.
    pairs = {"output_blocks_0_0": ("middle_block_2", "input_blocks_3_1"),
             "output_blocks_1_0": ("output_blocks_0_1", "input_blocks_2_0"),
             "output_blocks_2_0": ("output_blocks_1_2", "input_blocks_1_0"),
             "output_blocks_3_0": ("output_blocks_2_0", "input_blocks_0_0")}
    for block, (h, skip) in pairs.items():
      np.testing.assert_array_equal(ins[block],
                                    np.concatenate([outs[h], outs[skip]], axis=-1))
    self.assertEqual(outs["output_blocks_1_2"].shape, (2, 16, 16, 64))


class LayerTest(absltest.TestCase):

  def test_attention_matches_legacy_pytorch_layout(self):
    b, hgt, wid, c, d = 2, 3, 4, 64, 16  # 4 heads
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, hgt, wid, c)).astype(np.float32)
    p = {"norm_w": rng.normal(size=c), "norm_b": rng.normal(size=c),
         "qkv_w": rng.normal(size=(3 * c, c)) / 8, "qkv_b": rng.normal(size=3 * c),
         "proj_w": rng.normal(size=(c, c)) / 8, "proj_b": rng.normal(size=c)}
    # PyTorch Conv1d weights (O, I, 1) -> Dense kernel w[:, :, 0].T (REFERENCE.md 10.3).
    flax_params = {"params": {
        "norm": {"scale": p["norm_w"], "bias": p["norm_b"]},
        "qkv": {"kernel": p["qkv_w"].T, "bias": p["qkv_b"]},
        "proj_out": {"kernel": p["proj_w"].T, "bias": p["proj_b"]}}}
    flax_params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), flax_params)
    block = unet_lib.AttentionBlock(num_head_channels=d)
    out = block.apply(flax_params, jnp.asarray(x))
    x_nct = x.transpose(0, 3, 1, 2).reshape(b, c, hgt * wid).astype(np.float64)
    ref = _legacy_attention_nct(x_nct, p, heads=c // d)
    ref = ref.reshape(b, c, hgt, wid).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)

  def test_resample_geometry(self):
    x = jnp.arange(2 * 6 * 6 * 2, dtype=jnp.float32).reshape(2, 6, 6, 2)
    center = np.zeros((3, 3, 2, 2), np.float32)
    center[1, 1] = np.eye(2)
    conv = {"kernel": jnp.asarray(center), "bias": jnp.zeros(2)}
    # Symmetric pad 1 with stride 2 puts output (i, j) over input (2i, 2j).
    down = unet_lib.Downsample().apply({"params": {"op": conv}}, x)
    np.testing.assert_array_equal(np.asarray(down), np.asarray(x)[:, ::2, ::2])
    up = unet_lib.Upsample().apply({"params": {"conv": conv}}, x)
    np.testing.assert_array_equal(np.asarray(up), np.asarray(x).repeat(2, 1).repeat(2, 2))

  def test_timestep_embedding_is_cos_then_sin(self):
    t = np.array([0, 1, 17, 500, 999])
    for dim in (224, 7):
      half = dim // 2
      freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
      args = t[:, None] * freqs[None]
      ref = np.concatenate([np.cos(args), np.sin(args)] + ([np.zeros((5, 1))] if dim % 2 else []),
                           axis=1)
      got = unet_lib.timestep_embedding(jnp.asarray(t), dim)
      self.assertEqual(got.shape, (5, dim))
      np.testing.assert_allclose(np.asarray(got), ref, atol=5e-4)


if __name__ == "__main__":
  absltest.main()
