"""grain pipelines: batch contract, determinism, resumption, sharding, 6K-Mix."""

import collections
import os

import grain
import numpy as np
from PIL import Image
import pytest

from infd_jax.data import image_io
from infd_jax.data import pipeline
from infd_jax.data import prepare
from infd_jax.data import sources

SIDES = (40, 48, 57, 64, 72, 80, 96)


def _photo(side: int, i: int) -> Image.Image:
  img = Image.open(os.path.join(sources.demo_source_dir(), sources.DEMO_FILES[i % len(sources.DEMO_FILES)]))
  return img.convert("RGB").resize((side, side), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  src = root / "folder"
  src.mkdir()
  for i, side in enumerate(SIDES):
    _photo(side, i).save(src / f"img{i}.png")
  ffhq = root / "ffhq"
  ffhq.mkdir()
  for i in range(8):
    _photo(64, i).save(ffhq / f"{i:05d}.png")
  out = str(root / "data")
  limits = image_io.ImageLimits(min_side=32)
  prepare.prepare("image_folder", out, source=str(src), limits=limits)
  prepare.prepare("ffhq", out, configs=["mix6k", "lanczos256"], source=str(ffhq),
                  limits=limits, mix=sources.MixSpec(4, 3, 32, 64))
  return out


def _cfg(data_dir, **kw):
  cfg = dict(name="image_folder", data_dir=data_dir, inp_res=32, patch=32,
             gt_res_min=32, gt_res_max=64, num_workers=0)
  cfg.update(kw)
  return cfg


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_ae_batch_contract(data_dir):
  batches = _take(pipeline.make_ae_dataset(_cfg(data_dir), global_batch_size=4, seed=0), 4)
  for b in batches:
    assert set(b) == {"inp", "gt", "crop"}
    assert b["inp"].shape == (4, 32, 32, 3) and b["gt"].shape == (4, 32, 32, 3)
    assert b["inp"].dtype == b["gt"].dtype == np.uint8
    assert b["crop"].shape == (4, 3) and b["crop"].dtype == np.int32
    r, ii, jj = b["crop"].T
    assert np.all((r >= 32) & (r <= 64))
    assert np.all((ii >= 0) & (ii <= r - 32) & (jj >= 0) & (jj <= r - 32))


def test_dm_batches_and_resize(data_dir):
  ds = pipeline.make_dm_dataset(_cfg(data_dir, resize=48, inp_res=24),
                                global_batch_size=3, seed=0)
  (b,) = _take(ds, 1)
  assert set(b) == {"inp"} and b["inp"].shape == (3, 24, 24, 3)


def test_same_seed_same_batches(data_dir):
  make = lambda seed: pipeline.make_ae_dataset(_cfg(data_dir), global_batch_size=2, seed=seed)
  a, b, c = _take(make(1), 5), _take(make(1), 5), _take(make(2), 5)
  _assert_same(a, b)
  assert any(not np.array_equal(x["gt"], y["gt"]) for x, y in zip(a, c))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_restored_iterator_continues_exactly(data_dir, num_workers):
  cfg = _cfg(data_dir, num_workers=num_workers)
  make = lambda: pipeline.make_ae_dataset(cfg, global_batch_size=2, seed=3)
  it = iter(make())
  for _ in range(5):   # past the first epoch of 7 records
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = iter(make())
  restored.set_state(state)
  _assert_same([next(restored) for _ in range(4)], expected)
  for i in (it, restored):
    if hasattr(i, "close"):
      i.close()


def test_orbax_checkpoint_of_iterator(data_dir, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  make = lambda: iter(pipeline.make_ae_dataset(_cfg(data_dir), global_batch_size=2, seed=4))
  it = make()
  next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data_iter",),
                             item_handlers={"data_iter": grain.checkpoint.CheckpointHandler()}
                             ) as mngr:
    mngr.save(1, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    fresh = make()
    mngr.restore(1, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same([next(fresh) for _ in range(3)], expected)


def test_global_batches_do_not_depend_on_the_process_count():
  records = grain.MapDataset.source(list(range(11)))
  draw = lambda x, rng: {"id": np.int64(x), "u": rng.uniform()}
  make = lambda p, n: list(pipeline.batched(records, draw, dict(num_epochs=2), global_batch_size=6,
                                            seed=0, process_index=p, process_count=n))
  one = make(0, 1)
  three = [make(p, 3) for p in range(3)]
  # 22 examples -> 3 whole global batches of 6; every process yields all 3 slices.
  assert len(one) == 3 and [len(b) for b in three] == [3, 3, 3]
  for k, batch in enumerate(one):
    for key in ("id", "u"):
      np.testing.assert_array_equal(np.concatenate([three[p][k][key] for p in range(3)]),
                                    batch[key])
  ids = np.concatenate([b["id"] for b in one])
  assert sorted(ids[:11]) == list(range(11))  # the first epoch is a permutation
  with pytest.raises(ValueError, match="not divisible by process_count 2"):
    pipeline.batched(records, draw, {}, global_batch_size=3, seed=0, process_count=2)


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
  records = grain.MapDataset.source(list(range(40)))
  ident = lambda x, rng: {"id": np.int64(x)}
  order = lambda seed: [int(b["id"][0]) for b in pipeline.batched(
      records, ident, dict(num_epochs=2), global_batch_size=1, seed=seed)]
  a = order(0)
  assert a == order(0) and a != order(1)
  assert a[:40] != a[40:] and sorted(a[:40]) == sorted(a[40:]) == list(range(40))


def test_mix6k_pipeline_draws_from_both_pools(data_dir):
  cfg = _cfg(data_dir, name="ffhq", variant="mix6k", gt_res_max=256)
  batches = _take(pipeline.make_ae_dataset(cfg, global_batch_size=8, seed=0), 8)
  r = np.concatenate([b["crop"][:, 0] for b in batches])
  # HR images have sides 32..64, LR images 256; r > 64 only happens for LR.
  assert 0.25 < np.mean(r > 64.5) < 0.6
  _assert_same(batches[:2], _take(pipeline.make_ae_dataset(cfg, global_batch_size=8,
                                                           seed=0), 2))


def test_config_errors(data_dir):
  with pytest.raises(ValueError, match="unknown data config keys"):
    pipeline.make_ae_dataset(_cfg(data_dir, batch=3), global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_ae_dataset(_cfg(data_dir), global_batch_size=5, seed=0, process_count=2)
  assert set(pipeline.default_data_config()) >= {"name", "data_dir", "patch", "num_workers"}
