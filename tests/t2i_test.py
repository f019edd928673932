"""The text-to-image recipe end to end on tiny data: stage (b) through `jobs.run`, then generation.

Real parts throughout: demo photos written as PNG files with sidecar captions and
prepared by the image_folder builder, the tiny SD 1.x fixture imported by the
converter's command-line body, OpenCLIP's tokenizer on the tiny BPE vocabulary of
`tests/fixtures/clip`, orbax checkpoints. The tiny SD text tower has 100 tokens,
fewer than any byte-level BPE vocabulary (at least 514), so the imported token
table is widened to the vocabulary's 720 rows (the fixture's 100 rows kept, the
others drawn at random) and saved again with `convert.sd.save`.
"""

import hashlib
import json
import pathlib

import jax
import numpy as np
import PIL.Image
import pytest
import skimage.data

from configs import tiny
from infd_jax import checkpointing, jobs, trained
from infd_jax.clip.tokenizer import Tokenizer
from infd_jax.convert import sd

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
  """Stage (b): 2 steps, then resumed to 3 in the same workdir; a straight 3-step run beside."""
  before = _digest(setup["weights"])
  resumed, straight = setup["tmp"] / "resumed", setup["tmp"] / "straight"
  jobs.run(t2i_config(setup, "t2i_unet", dm_steps=2), resumed)
  jobs.run(t2i_config(setup, "t2i_unet", dm_steps=3), resumed)
  jobs.run(t2i_config(setup, "t2i_unet", dm_steps=3), straight)
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
  first, imported = _state_fields(setup, resumed, 1)
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
