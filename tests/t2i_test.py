"""The text-to-image recipe end to end on tiny data: stage (b) through `jobs.run`, then generation.

Real parts throughout: demo photos written as PNG files with sidecar captions and
prepared by the image_folder builder, the tiny SD 1.x fixture imported by the
converter's command-line body, OpenCLIP's tokenizer on the tiny BPE vocabulary of
`tests/fixtures/clip`, orbax checkpoints. The tiny SD text tower has 100 tokens,
fewer than any byte-level BPE vocabulary (at least 514), so the imported token
table is widened to the vocabulary's 720 rows (the fixture's 100 rows kept, the
others drawn at random) and saved again with `convert.sd.save`.
"""

import functools
import hashlib
import json
import pathlib
import shutil

import jax
import numpy as np
import PIL.Image
import pytest
import skimage.data

from configs import tiny
from infd_jax import builders, checkpointing, jobs, trained
from infd_jax.clip.tokenizer import Tokenizer
from infd_jax.convert import sd
from infd_jax.diffusion import samplers, schedules

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
VOCAB = FIXTURES / "clip" / "tiny_bpe.txt.gz"
CAPTIONS = {"astronaut": "an astronaut in a white suit", "chelsea": "a cat",
            "coffee": "a cup of coffee on a plate", "rocket": "a rocket on its launch pad"}


def _digest(folder: pathlib.Path) -> str:
  h = hashlib.sha256()
  for f in sorted(p for p in folder.rglob("*") if p.is_file()):
    h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
  return h.hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("t2i")
  photos = tmp / "photos"
  photos.mkdir()
  for name, caption in CAPTIONS.items():
    PIL.Image.fromarray(getattr(skimage.data, name)()).save(photos / f"{name}.png")
    (photos / f"{name}.txt").write_text(caption + "\n")
  imported = tmp / "imported"
  assert sd.main(["--input", str(FIXTURES / "sd" / "sd1"), "--output", str(imported)]) == 0
  trees, meta = sd.load(imported)
  table = trees["text"]["token_embedding"]["embedding"]
  vocab_size = Tokenizer(VOCAB).vocab_size
  extra = np.random.default_rng(0).normal(0, 0.02, (vocab_size - len(table), table.shape[1]))
  trees["text"]["token_embedding"]["embedding"] = np.concatenate(
      [table, extra.astype(table.dtype)])
  meta["text"]["vocab_size"] = vocab_size
  weights = tmp / "sd_weights"
  sd.save(weights, trees, {k: v for k, v in meta.items() if k not in ("format", "source")},
          meta["source"])
  return dict(tmp=tmp, photos=photos, weights=weights, data=tmp / "data")


def t2i_config(setup, stage: str, **train):
  c = tiny.get_config()
  c.stage = stage
  c.data.update(name="image_folder", source=str(setup["photos"]), data_dir=str(setup["data"]),
                inp_res=16, dm_variant="", eval_split="")
  c.t2i.update(sd_weights=str(setup["weights"]), vocab=str(VOCAB), uncond_prob=0.25)
  c.optim.update(dm_lr=1e-3, dm_ema=0.9)
  c.train.update(dm_batch_size=8, ckpt_every=1, keep_checkpoints=10, **train)
  return c


def _state_fields(setup, workdir, step: int, fields=("params", "ema_params")):
  """The fields of a stage-(b) checkpoint, and the imported trees."""
  trees, _ = sd.load(setup["weights"])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                          trees["unet"])
  ckpt = checkpointing.Checkpointer(trained.stage_dir(workdir, "t2i_unet"), read_only=True)
  try:
    out = ckpt.restore_fields({f: abstract for f in fields}, step=step)
  finally:
    ckpt.close()
  return {f: jax.tree.map(np.asarray, v) for f, v in out.items()}, trees


@pytest.fixture(scope="module")
def trained_unet(setup):
  """Stage (b) 3 steps straight; its steps 1-2 copied to a second workdir resumed to 3."""
  before = _digest(setup["weights"])
  straight, resumed = setup["tmp"] / "straight", setup["tmp"] / "resumed"
  jobs.run(t2i_config(setup, "t2i_unet", dm_steps=3), straight)
  shutil.copytree(trained.stage_dir(straight, "t2i_unet"), trained.stage_dir(resumed, "t2i_unet"),
                  ignore=shutil.ignore_patterns("3"))
  assert checkpointing.saved_steps(trained.stage_dir(resumed, "t2i_unet")) == [2, 1]
  jobs.run(t2i_config(setup, "t2i_unet", dm_steps=3), resumed)
  assert _digest(setup["weights"]) == before  # the imported SD folder is only read
  return dict(resumed=resumed, straight=straight)


def test_prepare_stores_sidecar_captions(setup, trained_unet):
  del trained_unet  # prepared the data
  from infd_jax.data import sources  # pylint: disable=g-import-not-at-top
  records = sources.open_split(str(setup["data"]), "image_folder", "default", "train")
  got = {str(r["name"], "utf-8") if isinstance(r["name"], bytes) else r["name"]: r["caption"]
         for r in (records[i] for i in range(len(records)))}
  got = {k: v.decode() if isinstance(v, bytes) else v for k, v in got.items()}
  assert got == {f"{k}.png": v for k, v in CAPTIONS.items()}


def test_stage_b_starts_from_the_imported_unet_checkpoints_and_resumes(setup, trained_unet):
  resumed = trained_unet["resumed"]
  assert checkpointing.saved_steps(trained.stage_dir(resumed, "t2i_unet")) == [3, 2, 1]
  first, imported = _state_fields(setup, trained_unet["straight"], 1)
  # The EMA after one step from the imported weights p0: 0.9 p0 + 0.1 p1 (closed form).
  p0, p1, ema = imported["unet"], first["params"], first["ema_params"]
  for a, b, e in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), jax.tree.leaves(ema)):
    np.testing.assert_allclose(e, 0.9 * np.asarray(a) + 0.1 * b, rtol=1e-5, atol=1e-7)
  assert max(float(np.max(np.abs(b - np.asarray(a))))
             for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1))) > 0
  # Resumed from step 2 (state, data iterator, rng): the same as three steps straight.
  last, _ = _state_fields(setup, resumed, 3)
  straight, _ = _state_fields(setup, trained_unet["straight"], 3)
  for a, b in zip(jax.tree.leaves(last), jax.tree.leaves(straight)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def stage_a_config(setup):
  """Stage (a) on SD's encoder (the tiny KL-f2 of the fixture): decoder and renderer train."""
  arch = sd.load(setup["weights"])[1]["vae"]
  c = t2i_config(setup, "ae", ae_steps=1)
  c.data.update(patch=32, gt_res_min=32, gt_res_max=64, variant="")
  c.ae.update(ch=arch["ch"], ch_mult=arch["ch_mult"], num_res_blocks=arch["num_res_blocks"],
              z_channels=arch["z_channels"], norm_groups=arch["norm_groups"], num_codes=0,
              renderer_hidden=16, kl_encoder=True)
  c.optim.ae_frozen = ("encoder",)
  return c


@pytest.fixture(scope="module")
def t2i_workdir(setup, trained_unet):
  """The resumed stage-(b) workdir with a 1-step stage (a) beside it."""
  workdir = trained_unet["resumed"]
  jobs.run(stage_a_config(setup), workdir)
  return workdir


@pytest.fixture(scope="module")
def model(t2i_workdir):
  """`infd_jax.load` of the workdir, shared by the API tests so that they share its programs
  (the t2i job only reads the checkpoints)."""
  import infd_jax  # pylint: disable=g-import-not-at-top
  return infd_jax.load(t2i_workdir)


@pytest.fixture(scope="module")
def conditional_sample(setup, model):
  """The independent reference of unguided sampling: (sampler name, key, one prompt's context
  [1, L, width]) -> latents [h, w, c] of that sampler on SD's UNet called with the context
  alone (no guidance wrapper), SD's schedule, divided by SD's scaling factor. One jitted
  program, the context an argument, shared by the tests."""
  arch = sd.load(setup["weights"])[1]
  sched = schedules.scaled_linear_schedule(**arch["schedule"])
  c = model.config
  shape = (1, *builders.latent_shape(c))

  @functools.partial(jax.jit, static_argnums=0)
  def sample(name, params, key, context):
    apply = lambda p, x, t: model.t2i.unet.apply({"params": p}, x, t, context)
    return samplers.sample(name, apply, params, key, shape, sched,
                           num_steps=c.diffusion.sample_steps, eta=c.diffusion.eta,
                           spacing=c.sample.spacing)[0] / arch["scaling_factor"]
  return lambda name, key, context: np.asarray(sample(name, model.dm_params, key, context))


PROMPTS = ("a cat", "a rocket on its launch pad")


def test_stage_a_starts_from_sds_encoder_and_keeps_it_bit_identical(setup, t2i_workdir):
  from infd_jax import sharding  # pylint: disable=g-import-not-at-top
  trees, _ = sd.load(setup["weights"])
  saved = trained.load_ae_params(stage_a_config(setup), t2i_workdir,
                                 sharding.make_mesh(-1, 1))["encoder"]
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(trees["vae"]["encoder"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_guidance_scale_1_is_the_conditional_sampler(setup, model, conditional_sample):
  assert model.t2i is not None and model.config.ae.kl_encoder
  z = model.generate_latents(PROMPTS, n=2, seed=3, guidance_scale=1.0)
  guided = model.generate_latents(PROMPTS, n=2, seed=3, guidance_scale=4.0)
  # Independently: the UNet on each prompt's context alone, no guidance wrapper.
  trees = sd.load(setup["weights"])[0]
  context = model.t2i.text.apply({"params": trees["text"]}, model.t2i.tokenizer(list(PROMPTS)))
  for i in range(4):
    want = conditional_sample(model.config.sample.sampler,
                              jax.random.fold_in(jax.random.PRNGKey(3), i), context[i // 2][None])
    np.testing.assert_allclose(z[i], want, rtol=1e-4, atol=1e-5)
  assert np.max(np.abs(guided - z)) > 1e-3  # the scale acts
  assert not np.allclose(z[0], z[1])  # two copies of one prompt differ


def test_conditions_on_regions_guide_the_prompts_sampler(setup, model, conditional_sample,
                                                         tmp_path):
  """Model.condition of a text-to-image model: unguided, it is DDIM of the UNet on the
  prompt's context alone (guidance scale 1); guided, the known pixels move closer."""
  from infd_jax.rendering import pixels  # pylint: disable=g-import-not-at-top
  size, box = 16, (2, 2, 12, 12)
  target = np.random.default_rng(1).normal(size=(1, *builders.latent_shape(model.config)))
  known = pixels.to_uint8(model.render(target.astype(np.float32), size))[0, 2:14, 2:14]
  PIL.Image.fromarray(known).save(tmp_path / "known.png")
  region = {"kind": "known", "size": [size, size], "box": list(box),
            "image": str(tmp_path / "known.png"), "scale": 10}
  steps = model.config.diffusion.sample_steps
  z0, loss0 = model.condition([region], n=2, seed=3, prompt=PROMPTS[1], guidance_scale=1.0,
                              guide_start=steps)
  trees = sd.load(setup["weights"])[0]
  context = model.t2i.text.apply({"params": trees["text"]}, model.t2i.tokenizer([PROMPTS[1]]))
  for i in range(2):
    want = conditional_sample("ddim", jax.random.fold_in(jax.random.PRNGKey(3), i), context)
    np.testing.assert_allclose(z0[i], want, rtol=1e-4, atol=1e-5)
  z, loss = model.condition([region], n=2, seed=3, prompt=PROMPTS[1], guidance_scale=1.0)
  assert np.all(loss[:, 0] < loss0[:, 0]), (loss, loss0)
  from infd_jax import checks  # pylint: disable=g-import-not-at-top
  with pytest.raises(checks.UserError, match="needs prompt"):
    model.condition([region], n=1)


def test_stage_t2i_writes_each_size_and_a_window_as_the_api_renders_them(setup, t2i_workdir,
                                                                        model):
  from infd_jax.rendering import pixels  # pylint: disable=g-import-not-at-top
  c = t2i_config(setup, "t2i")
  c.t2i.update(prompts=PROMPTS, guidance_scale=2.5)
  out = setup["tmp"] / "samples"
  c.sample.update(num_samples=2, batch_size=3, sizes=(16, 40), window=(), seed=5,
                  out_dir=str(out))
  jobs.run(c, t2i_workdir)
  c.sample.update(sizes=(40,), window=(8, 4, 24, 20), out_dir=str(out))
  jobs.run(c, t2i_workdir)
  assert json.loads((out / "prompts.json").read_text()) == {
      "0": PROMPTS[0], "1": PROMPTS[0], "2": PROMPTS[1], "3": PROMPTS[1]}
  for size in (16, 40):
    want = pixels.to_uint8(model.generate(PROMPTS, size, n=2, seed=5, guidance_scale=2.5))
    for i in range(4):
      got = np.asarray(PIL.Image.open(out / str(size) / f"{i}.png"))
      np.testing.assert_array_equal(got, want[i])
      if size == 40:
        crop = np.asarray(PIL.Image.open(out / "40_window_8_4_24x20" / f"{i}.png"))
        np.testing.assert_array_equal(crop, want[i][8:32, 4:24])
