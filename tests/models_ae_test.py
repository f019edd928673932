"""Stage-1 modules: parameter counts and names, shapes, blocks, quantizer, discriminator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from infd_jax.models import blocks, quantizer
from infd_jax.models.autoencoder import INFDAutoencoder
from infd_jax.models.discriminator import BatchNorm, PatchDiscriminator
from infd_jax.rendering import coords


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(module, *args, **kwargs):
  """Variable shapes of module.init(*args); args may be ShapeDtypeStructs."""
  return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a, **kwargs), *args)


def _tiny_ae(**overrides) -> INFDAutoencoder:
  kw = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=3, num_codes=16,
            renderer_hidden=32)
  return INFDAutoencoder(**{**kw, **overrides})


class FullSizeTest(absltest.TestCase):
  """Official-size modules, by shape only (never initialised)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    grid = jax.ShapeDtypeStruct((1, 64, 48, 2), jnp.float32)
    cls.model = INFDAutoencoder()
    cls.variables = _shapes(cls.model, x, grid, grid)
    cls.out = jax.eval_shape(cls.model.apply, cls.variables, x, grid, grid)

  def test_param_counts(self):
    p = self.variables["params"]
    self.assertEqual(_count(p["encoder"]), 22_337_423)
    self.assertEqual(_count(p["quantizer"]), 24_576)
    self.assertEqual(_count(p["decoder"]), 32_957_068)
    self.assertEqual(_count(p["renderer"]), 2_674_179)
    self.assertEqual(_count(p), 22_337_423 + 24_576 + 32_957_068 + 2_674_179)
    disc = _shapes(PatchDiscriminator(), jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32),
                   train=False)
    self.assertEqual(_count(disc["params"]), 2_765_633)
    self.assertEqual(_count(disc["batch_stats"]), 1_792)  # + 3 num_batches_tracked in torch

  def test_shapes(self):
    self.assertEqual(self.out.z.shape, (1, 64, 64, 3))
    self.assertEqual(self.out.indices.shape, (1, 64, 64))
    self.assertEqual(self.out.pred.shape, (1, 64, 48, 3))
    phi = jax.eval_shape(lambda v, z: self.model.apply(v, z, method="decode"), self.variables,
                         self.out.z_q)
    self.assertEqual(phi.shape, (1, 256, 256, 128))
    logits = jax.eval_shape(
        lambda x: PatchDiscriminator().init_with_output(jax.random.key(0), x, train=True)[0],
        jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
    self.assertEqual(logits.shape, (2, 30, 30, 1))

  def test_names_follow_state_dict(self):
    p = nn.unbox(self.variables["params"])
    enc, dec, ren = p["encoder"], p["decoder"], p["renderer"]
    self.assertEqual(enc["down_1_block_0"]["nin_shortcut"]["kernel"].shape, (1, 1, 128, 256))
    self.assertEqual(enc["down_1_downsample"]["conv"]["kernel"].shape, (3, 3, 256, 256))
    self.assertNotIn("down_2_downsample", enc)
    self.assertEqual(set(enc["mid_attn_1"]), {"norm", "q", "k", "v", "proj_out"})
    self.assertEqual(enc["quant_conv"]["kernel"].shape, (1, 1, 3, 3))
    self.assertEqual(dec["post_quant_conv"]["kernel"].shape, (1, 1, 3, 3))
    self.assertEqual(dec["up_1_block_0"]["nin_shortcut"]["kernel"].shape, (1, 1, 512, 256))
    self.assertIn("up_2_block_2", dec)
    self.assertNotIn("up_0_upsample", dec)
    self.assertNotIn("norm_out", dec)
    self.assertEqual(p["quantizer"]["embedding"].shape, (8192, 3))
    self.assertEqual(ren["model_0"]["kernel"].shape, (3, 3, 132, 256))
    self.assertEqual(set(ren), {"model_0", "model_1", "model_2", "norm_out", "conv_out"})
    kernel = self.variables["params"]["renderer"]["conv_out"]["kernel"]
    self.assertEqual(kernel.names, ("conv_h", "conv_w", "conv_in", "conv_out"))


class TinyAutoencoderTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = _tiny_ae()
    cls.x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    c, ce = coords.make_coord_cell_grid((12, 20), batch=2)
    cls.coord, cls.cell = jnp.asarray(c), jnp.asarray(ce)

    def init_and_run(key, x, coord, cell):
      m = cls.model
      v = m.init(key, x, coord, cell)
      z = m.apply(v, x, method="encode")
      vq = m.apply(v, z, method="quantize")
      phi = m.apply(v, vq.z_q, method="decode")
      pred = m.apply(v, phi, coord, cell, method="render")
      h = m.apply(v, phi, coord, cell, method="render_features")
      head = m.apply(v, h, method="render_head")
      return z, vq, phi, pred, head, m.apply(v, x, coord, cell)
    # One compilation for init and every method keeps the test fast.
    cls.results = jax.jit(init_and_run)(jax.random.key(0), cls.x, cls.coord, cls.cell)

  def test_shapes_and_methods_agree(self):
    z, vq, phi, pred, head, out = self.results
    self.assertEqual(z.shape, (2, 8, 8, 3))
    self.assertEqual(phi.shape, (2, 16, 16, 32))
    self.assertEqual(out.pred.shape, (2, 12, 20, 3))
    self.assertEqual(out.pred.dtype, jnp.float32)
    self.assertTrue(np.isfinite(out.pred).all())
    np.testing.assert_allclose(out.pred, pred, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head, pred, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.indices, vq.indices)
    np.testing.assert_allclose(out.quant_loss, vq.loss, rtol=1e-6)

  def test_decoder_levels_of_its_own_upsample_phi_beyond_the_input(self):
    """An f1 encoder with decoder levels (1, 2, 2): z at the input size, phi at 4x it,
    with 64-channel phi (ch * 2) feeding the renderer."""
    model = _tiny_ae(ch_mult=(1,), decoder_ch_mult=(2, 2, 1))
    shapes = _shapes(model, self.x, self.coord, self.cell)
    out = jax.eval_shape(model.apply, shapes, self.x, self.coord, self.cell)
    self.assertEqual(out.z.shape, (2, 16, 16, 3))
    phi = jax.eval_shape(lambda v, z: model.apply(v, z, method="decode"), shapes, out.z_q)
    self.assertEqual(phi.shape, (2, 64, 64, 64))
    self.assertEqual(out.pred.shape, (2, 12, 20, 3))
    params = shapes["params"]
    self.assertNotIn("down_0_downsample", params["encoder"])
    self.assertEqual(sorted(k for k in params["decoder"] if k.endswith("_upsample")),
                     ["up_1_upsample", "up_2_upsample"])
    self.assertEqual(nn.unbox(params["renderer"]["model_0"]["kernel"]).shape[-2], 64 + 4)

  def test_input_colour_is_an_affine_map_of_the_encoder_input(self):
    """With `input_colour`, z equals the plain encoder's z of the mapped image (numpy)."""
    rng = np.random.default_rng(0)
    affine = rng.normal(size=12)
    mapped = np.asarray(self.x, np.float64) @ affine[:9].reshape(3, 3).T + affine[9:]
    plain, coloured = _tiny_ae(num_codes=0), _tiny_ae(num_codes=0, input_colour=tuple(affine))
    v = plain.init(jax.random.key(0), self.x, self.coord, self.cell)
    z = coloured.apply(v, self.x, method="encode")
    want = plain.apply(v, jnp.asarray(mapped, jnp.float32), method="encode")
    np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-5)
    self.assertGreater(float(jnp.abs(z - plain.apply(v, self.x, method="encode")).max()), 1e-2)

  def test_bfloat16_compute_keeps_float32_params(self):
    model = _tiny_ae(dtype=jnp.bfloat16)
    shapes = _shapes(model, self.x, self.coord, self.cell)
    self.assertTrue(all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes)))
    out = jax.eval_shape(model.apply, shapes, self.x, self.coord, self.cell)
    self.assertEqual(out.pred.dtype, jnp.float32)
    self.assertEqual(out.z.dtype, jnp.float32)
    phi = jax.eval_shape(lambda v, z: model.apply(v, z, method="decode"), shapes, out.z_q)
    self.assertEqual(phi.dtype, jnp.bfloat16)


class BlocksTest(absltest.TestCase):

  def test_downsample_pads_bottom_right(self):
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    m = blocks.Downsample()
    v = m.init(jax.random.key(0), x)
    # Kernel reads only the bottom-right tap: out[i, j] = padded[2i + 2, 2j + 2].
    kernel = jnp.zeros((3, 3, 1, 1)).at[2, 2].set(1.0)
    v = {"params": {"conv": {"kernel": kernel, "bias": jnp.zeros(1)}}}
    out = m.apply(v, x)[0, ..., 0]
    np.testing.assert_array_equal(out, [[x[0, 2, 2, 0], 0.0], [0.0, 0.0]])
    kernel = jnp.zeros((3, 3, 1, 1)).at[0, 0].set(1.0)  # top-left tap: no top/left pad
    out = m.apply({"params": {"conv": {"kernel": kernel, "bias": jnp.zeros(1)}}}, x)[0, ..., 0]
    np.testing.assert_array_equal(out, x[0, ::2, ::2, 0])

  def test_upsample_is_nearest(self):
    x = jax.random.normal(jax.random.key(0), (1, 3, 2, 1))
    kernel = jnp.zeros((3, 3, 1, 1)).at[1, 1].set(1.0)
    out = blocks.Upsample().apply({"params": {"conv": {"kernel": kernel, "bias": jnp.zeros(1)}}}, x)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(x, 2, 1), 2, 2))

  def test_attention_matches_numpy(self):
    # 12 query rows: one call, and chunks of 4 rows (three rematerialised calls).
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 32))
    v = nn.unbox(blocks.AttnBlock().init(jax.random.key(1), x))["params"]
    lin = lambda n, a: a @ np.asarray(v[n]["kernel"][0, 0]) + np.asarray(v[n]["bias"])
    for chunk in (1024, 4):
      out = np.asarray(jax.jit(blocks.AttnBlock(query_chunk=chunk).apply)({"params": v}, x))
      for i in range(2):
        xs = np.asarray(x[i], np.float64).reshape(12, 32)
        g = xs.reshape(12, 32, 1)  # 32 groups of one channel: per-channel stats
        h = (g - g.mean(0)) / np.sqrt(g.var(0) + 1e-6)
        h = h.reshape(12, 32) * v["norm"]["scale"] + v["norm"]["bias"]
        q, k, val = lin("q", h), lin("k", h), lin("v", h)
        logits = q @ k.T / np.sqrt(32)
        w = np.exp(logits - logits.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        want = xs + lin("proj_out", w @ val)
        np.testing.assert_allclose(out[i].reshape(12, 32), want, rtol=1e-4, atol=1e-4)


class QuantizerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.vq = quantizer.VectorQuantizer(num_codes=5, code_dim=3)
    self.z = jax.random.normal(jax.random.key(0), (2, 3, 4, 3))
    self.params = nn.unbox(self.vq.init(jax.random.key(1), self.z))

  def test_init_range(self):
    e = self.params["params"]["embedding"]
    self.assertEqual(e.shape, (5, 3))
    self.assertLessEqual(float(jnp.max(jnp.abs(e))), 1 / 5)

  def test_nearest_code_and_loss_vs_numpy(self):
    codebook = jax.random.normal(jax.random.key(2), (5, 3))
    params = {"params": {"embedding": codebook}}
    out = self.vq.apply(params, self.z)
    z, e = np.asarray(self.z, np.float64), np.asarray(codebook, np.float64)
    d = ((z[..., None, :] - e) ** 2).sum(-1)
    idx = d.argmin(-1)
    np.testing.assert_array_equal(out.indices, idx)
    np.testing.assert_allclose(out.z_q, e[idx], rtol=1e-5, atol=1e-6)
    mse = ((e[idx] - z) ** 2).mean()
    np.testing.assert_allclose(out.loss, mse + 0.25 * mse, rtol=1e-5)

  def test_ties_go_to_lowest_index(self):
    codebook = jnp.asarray([[1.0, 0, 0], [0, 0, 0], [0, 0, 0], [-1.0, 0, 0]])
    z = jnp.zeros((1, 1, 2, 3)).at[0, 0, 1, 0].set(0.5)  # 0 ties codes 1, 2; 0.5 ties 0, 1, 2
    idx = quantizer.nearest_code(z, codebook)
    np.testing.assert_array_equal(idx, [[[1, 0]]])

  def test_chunked_search_matches_brute_force_with_ties_across_chunks(self):
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(12, 3)).astype(np.float32)
    codebook[9] = codebook[2]  # a duplicate in a later chunk: index 2 must win
    codebook[7] = codebook[6]  # a duplicate inside one chunk of 4
    z = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    z[0, 0, :2] = codebook[[2, 6]]
    d = ((z.astype(np.float64)[..., None, :] - codebook.astype(np.float64)) ** 2).sum(-1)
    want = d.argmin(-1)  # numpy's argmin: first index of the minimum
    self.assertEqual(want[0, 0, 0], 2)
    self.assertEqual(want[0, 0, 1], 6)
    for chunk in (4, 5):  # 5 does not divide 12: one chunk of all codes
      got = jax.jit(quantizer.nearest_code, static_argnums=2)(z, codebook, chunk)
      np.testing.assert_array_equal(got, want)

  def test_straight_through_and_codebook_gradients(self):
    codebook = jax.random.normal(jax.random.key(2), (5, 3))
    w = jax.random.normal(jax.random.key(3), self.z.shape)

    def f(e, z):
      out = self.vq.apply({"params": {"embedding": e}}, z)
      return jnp.sum(w * out.z_q), out.loss

    g_rec_e, g_rec_z = jax.grad(lambda e, z: f(e, z)[0], argnums=(0, 1))(codebook, self.z)
    np.testing.assert_allclose(g_rec_z, w, rtol=1e-6)  # identity through z_q
    np.testing.assert_array_equal(g_rec_e, 0)
    g_loss_e, g_loss_z = jax.grad(lambda e, z: f(e, z)[1], argnums=(0, 1))(codebook, self.z)
    idx = np.asarray(quantizer.nearest_code(self.z, codebook)).reshape(-1)
    z, e = np.asarray(self.z).reshape(-1, 3), np.asarray(codebook)
    n = z.size
    np.testing.assert_allclose(g_loss_z.reshape(-1, 3), 2 * (z - e[idx]) / n, rtol=1e-5, atol=1e-7)
    want_e = np.zeros_like(e)
    np.add.at(want_e, idx, 0.25 * 2 * (e[idx] - z) / n)
    np.testing.assert_allclose(g_loss_e, want_e, rtol=1e-5, atol=1e-7)

  def test_lookup(self):
    idx = jnp.asarray([[0, 0, 3, 1]])
    np.testing.assert_array_equal(
        self.vq.apply(self.params, idx, method="lookup"),
        self.params["params"]["embedding"][np.asarray(idx)])


class DiscriminatorTest(absltest.TestCase):

  def test_batchnorm_train_and_eval(self):
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 3, 5, 6))
    bn = BatchNorm()
    v = nn.unbox(bn.init(jax.random.key(1), x, train=True))
    np.testing.assert_array_equal(v["batch_stats"]["mean"], 0)
    np.testing.assert_array_equal(v["batch_stats"]["var"], 1)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    xs = np.asarray(x, np.float64).reshape(-1, 6)
    scale, bias = np.asarray(v["params"]["scale"]), np.asarray(v["params"]["bias"])
    want = (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5) * scale + bias
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 6), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * xs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-5)
    y_eval = bn.apply({**v, **upd}, x, train=False)
    stats = upd["batch_stats"]
    want = ((xs - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
            * scale + bias)
    np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 6), want, rtol=1e-4, atol=1e-5)

  def test_init_statistics_and_tiny_forward(self):
    d = PatchDiscriminator(ndf=32)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

    def init_and_run(key):
      v = nn.unbox(d.init(key, x, train=True))
      return v, d.apply(v, x, train=True, mutable=["batch_stats"])
    v, (logits, upd) = jax.jit(init_and_run)(jax.random.key(1))
    k = np.asarray(v["params"]["main_8"]["kernel"])
    self.assertAlmostEqual(float(k.std()), 0.02, delta=0.002)
    self.assertNotIn("bias", v["params"]["main_8"])
    self.assertIn("bias", v["params"]["main_11"])
    s = np.asarray(v["params"]["main_9"]["scale"])
    self.assertAlmostEqual(float(s.mean()), 1.0, delta=0.01)
    np.testing.assert_array_equal(v["params"]["main_9"]["bias"], 0)
    self.assertEqual(logits.shape, (2, 2, 2, 1))
    self.assertTrue(np.isfinite(logits).all())
    self.assertFalse(np.allclose(upd["batch_stats"]["main_3"]["mean"], 0))


if __name__ == "__main__":
  absltest.main()
