"""grain input pipelines for both stages (numpy/PIL only, no jax).

Chain: record source -> seeded shuffle -> repeat(num_epochs; None = forever,
each epoch reshuffled) -> random_map(transform, numpy Generator from grain,
seeded by the global index) -> batch(local_batch, drop_remainder=True) ->
local batches [process_index::process_count] -> to_iter_dataset ->
mp_prefetch(num_workers; 0 = in process). Global batch k is the same examples
and crops on 1 or N processes; process p reads only its slice of it.

Batch contract (numpy, NHWC, B = global_batch_size // process_count):
- stage 1 (`make_ae_dataset`), compact for the host -> device copy:
  - inp  uint8 [B, inp_res, inp_res, 3]: LANCZOS of the whole square;
  - gt   uint8 [B, P, P, 3]: window of the image resized to r x r;
  - crop int32 [B, 3]: (r, ii, jj), the window's resolution and origin.
  `training.on_device.ae_batch` turns it, inside the jitted step, into float32 inp
  and gt in [-1, 1], coord [B, P, P, 2] = (row, col) pixel centres of the
  window inside the r x r image, 2 * (ii + a + 0.5) / r - 1, and cell = 2 / r.
- stage 2 (`make_dm_dataset`): inp only, float32 in [-1, 1].
- text to image (`make_caption_dataset`, the stage-2 data settings): image
  float32 [B, inp_res, inp_res, 3] in [-1, 1] and tokens int32 [B, L], the
  record's caption (feature `caption_feature`) tokenized.

Datasets (`cfg.name`, `cfg.variant`, `cfg.split`), see `sources`:
- demo: the scikit-image photos, prepared on first use;
- image_folder: variant = the prepared config name (default "default");
  stage 1 of the official custom recipe uses resize=1024, stage 2 resize=256;
- ffhq: variant "native" (train/val at 1024), "lanczos256" (the stage-2 set,
  REFERENCE.md 5.3; split "train" for FFHQ, "train+val" for 6K-Mix), or "mix6k"
  (stage 1 only: LR pool = lanczos256 train+val, HR pool = mix6k hr, drawn
  with probability p_lr / 1 - p_lr per example as the official `random_lr_hr`;
  grain's `mix` would interleave the pools in fixed proportions instead).
  Equivalent stage-2 alternative: variant "native" with resize=256 gives the
  same images as lanczos256 but resizes at every read.

Every process yields the same number of batches (forever with num_epochs=None);
loops over a split that must see each example once use `infd_jax.data.padded`.

Checkpointing: `it = iter(ds)`; `it.get_state()` / `it.set_state(state)`, or
through orbax with `grain.checkpoint.CheckpointHandler` and
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.
"""

from typing import Any, Mapping

from absl import flags
import grain
import numpy as np

from infd_jax import defaults
from infd_jax.data import prepare as prepare_lib
from infd_jax.data import sources
from infd_jax.data import transforms


# Settings of `config.data` that stage 2 reads in place of the stage-1 ones, and the
# setting only the evaluation reads.
_STAGE2 = {"variant": "dm_variant", "split": "dm_split", "resize": "dm_resize"}
_NOT_READ = ("eval_split",)
# Keys scripts and tests may set that the config has no setting for.
PIPELINE_ONLY = dict(shuffle=True, num_epochs=None)  # num_epochs None: repeat forever


def stage_config(data: Mapping[str, Any], stage: str) -> dict[str, Any]:
  """`config.data` -> this module's keys for one stage ("" / 0 of variant, source and
  resize mean unset: None); `infd_jax.defaults` documents every setting."""
  d = dict(data)
  if stage == "dm":
    d.update({k: d[v] for k, v in _STAGE2.items()})
  return {k: None if d[k] in ("", 0) and k in ("variant", "source", "resize") else d[k]
          for k in d if k not in (*_STAGE2.values(), *_NOT_READ)}


def default_data_config() -> dict[str, Any]:
  """Every key this module reads, with its default: the config's (`infd_jax.defaults`, the
  one place of the data defaults) and the pipeline-only keys."""
  return stage_config(defaults.base().data, "ae") | PIPELINE_ONLY


def _cfg(cfg: Mapping[str, Any]) -> dict[str, Any]:
  out = default_data_config()
  unknown = set(cfg) - set(out)
  if unknown:
    raise ValueError(f"unknown data config keys: {sorted(unknown)}")
  out.update(cfg)
  return out


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} is not divisible by "
                     f"process_count {process_count}")
  return global_batch_size // process_count


def _records(c: dict[str, Any], config: str, split: str):
  return sources.open_split(c["data_dir"], c["name"], config, split)


def batched(ds: grain.MapDataset, transform, cfg: Mapping[str, Any], *,
            global_batch_size: int, seed: int, process_index: int = 0,
            process_count: int = 1) -> grain.IterDataset:
  """Shards, shuffles, repeats, maps, batches and prefetches a record dataset.

  Args:
    ds: random-access records (or indices for the 6K-Mix sampler).
    transform: callable (element, np.random.Generator) -> dict of numpy arrays.
    cfg: data config (keys of `default_data_config`).
    global_batch_size: batch over all processes.
    seed: pipeline seed, the same on every process.
    process_index: this process.
    process_count: number of processes.
  """
  c = _cfg(cfg)
  batch = local_batch_size(global_batch_size, process_count)
  # One global order: shuffle, repeat and per-example randomness (grain seeds
  # random_map by the element's index) are the same whatever the process count;
  # local batch k of process p is the p-th slice of global batch k.
  ds = ds.seed(seed)
  if c["shuffle"]:
    ds = ds.shuffle()
  ds = ds.repeat(c["num_epochs"]).random_map(transform)
  ds = ds.batch(batch, drop_remainder=True)
  if c["num_epochs"] is not None:  # finite: every process gets the same number of batches
    ds = ds[:len(ds) // process_count * process_count]
  ds = ds[process_index::process_count]
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=c["read_threads"],
                                            prefetch_buffer_size=max(2 * batch, c["read_threads"])))
  if c["num_workers"] > 0:
    if not flags.FLAGS.is_parsed():  # grain's worker processes read its absl flags
      raise ValueError(f"num_workers={c['num_workers']}: grain's worker processes read absl "
                       "flags, which are not parsed here; run inside absl.app.run, call "
                       "absl.flags.FLAGS.mark_as_parsed() first, or use num_workers=0")
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=c["num_workers"], per_worker_buffer_size=c["prefetch_buffer"]))
  return ds


def _ensure(c: dict[str, Any]) -> None:
  prepare_lib.ensure_prepared(c["name"], c["data_dir"], variant=c["variant"],
                              source=c["source"])


def make_ae_dataset(cfg: Mapping[str, Any], *, global_batch_size: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Stage-1 batches {inp, gt, crop} (see the module docstring).

  Args:
    cfg: `config.data` (keys of `default_data_config`).
    global_batch_size: batch over all processes (8 in the official configs).
    seed: pipeline seed (shuffle and per-example randomness).
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
  """
  ds, transform = _ae_source(_cfg(cfg))
  return batched(ds, transform, cfg, global_batch_size=global_batch_size, seed=seed,
                 process_index=process_index, process_count=process_count)


def _ae_source(c: dict[str, Any]) -> tuple[grain.MapDataset, Any]:
  _ensure(c)
  transform = transforms.AeTransform(
      inp_res=c["inp_res"], resize=c["resize"], patch=c["patch"],
      gt_res_min=c["gt_res_min"], gt_res_max=c["gt_res_max"],
      p_whole=c["p_whole"], p_max=c["p_max"], fast=c["fast_crop"], inp_crop=c["inp_crop"])
  if c["name"] == "ffhq" and c["variant"] == "mix6k":
    lr = _records(c, "lanczos256", "train+val")
    hr = _records(c, "mix6k", "hr")
    # Epoch length n_lr + n_hr as the official sampler; the index is ignored.
    return grain.MapDataset.range(len(lr) + len(hr)), transforms.PoolMix(transform, lr, hr,
                                                                        c["p_lr"])
  return grain.MapDataset.source(_records(c, _config_of(c), c["split"])), transform


def make_dm_dataset(cfg: Mapping[str, Any], *, global_batch_size: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Stage-2 batches {inp: [B, inp_res, inp_res, 3]}; arguments as make_ae_dataset."""
  ds, transform = _dm_source(_cfg(cfg))
  return batched(ds, transform, cfg, global_batch_size=global_batch_size, seed=seed,
                 process_index=process_index, process_count=process_count)


def check_captions(cfg: Mapping[str, Any], caption_feature: str) -> None:
  """ValueError unless the stage-2 records hold the text feature `caption_feature`."""
  ds, _ = _dm_source(_cfg(cfg))
  first = ds[0] if len(ds) else {}
  if caption_feature not in first:
    raise ValueError(
        f"the records of {cfg['name']} in {cfg['data_dir']} have no feature {caption_feature!r} "
        f"(they have {sorted(first)}): prepare the images with captions (image_folder reads a "
        "sidecar <image>.txt; add --overwrite to rewrite a dataset prepared without them) or "
        "set config.t2i.caption_feature")


def make_caption_dataset(cfg: Mapping[str, Any], *, tokenize, caption_feature: str,
                         global_batch_size: int, seed: int, process_index: int = 0,
                         process_count: int = 1) -> grain.IterDataset:
  """Text-to-image batches {image, tokens} (see `check_captions`); `tokenize` maps
  [caption] -> ids [1, L]; other arguments as make_ae_dataset, with the stage-2 settings
  (`stage_config(data, "dm")`)."""
  ds, image = _dm_source(_cfg(cfg))
  transform = transforms.CaptionTransform(image, tokenize, caption_feature)
  return batched(ds, transform, cfg, global_batch_size=global_batch_size, seed=seed,
                 process_index=process_index, process_count=process_count)


def _dm_source(c: dict[str, Any]) -> tuple[grain.MapDataset, Any]:
  if c["variant"] == "mix6k":
    raise ValueError("stage 2 of 6K-Mix reads variant='lanczos256', split='train+val'")
  _ensure(c)
  transform = transforms.DmTransform(inp_res=c["inp_res"], resize=c["resize"])
  return grain.MapDataset.source(_records(c, _config_of(c), c["split"])), transform


def split_examples(cfg: Mapping[str, Any], *, stage: str, seed: int, process_index: int = 0,
                   process_count: int = 1) -> tuple[grain.IterDataset, int]:
  """One unshuffled pass over a split, for evaluation and latent caching.

  Returns:
    (this process's examples, records[process_index::process_count], one at a
     time; the number of records in the split). Random crops are seeded by the
    global record index, so they do not depend on the process count. Batch them
    with `infd_jax.data.padded`.
  """
  c = _cfg(cfg)
  ds, transform = (_ae_source if stage == "ae" else _dm_source)(c)
  num_records = len(ds)
  ds = ds.seed(seed).random_map(transform)[process_index::process_count]
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=c["read_threads"])), num_records


def _config_of(c: dict[str, Any]) -> str:
  return prepare_lib.configs_needed(c["name"], c["variant"])[0]
