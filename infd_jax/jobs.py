"""Runs the job a config selects: `ae`, `dm`, `sample`, `eval`, `condition`, `all` (the demo),
or the text-to-image stages `t2i_unet` (fine-tune SD's UNet) and `t2i` (generate from prompts).

`run(config, workdir)` is the testable body of `python -m infd_jax.main`.
"""

import contextlib
import logging
import os
from typing import Iterable, Iterator

from etils import epath
import jax
import ml_collections

from infd_jax import config_checks, paths, sharding, trained
from infd_jax.checks import UserError
from infd_jax.data import pipeline
from infd_jax.evaluation import writers

log = logging.getLogger(__name__)


def _prepare_data(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Prepares the data a training stage reads if missing (always possible for the demo).

  Other datasets are prepared here only when `data.source` names the input folder.
  Process 0 prepares; the others wait for it (an all-gather is the barrier), so no
  two processes write the same files.
  """
  from infd_jax.data import prepare  # pylint: disable=g-import-not-at-top
  if not config.data.data_dir:
    config.data.data_dir = str(workdir / "data")
  # The datasets each training job reads (t2i_unet: the stage-2 settings).
  stages = {"all": ("ae", "dm"), "t2i_unet": ("dm",)}.get(config.stage, (config.stage,))
  error = None
  if jax.process_index() == 0:  # one writer; the other processes wait for it below
    try:
      for stage in stages:
        d = pipeline.stage_config(config.data, stage)
        # The demo's nine photos are quicker to prepare than worker processes are to start.
        workers = 1 if d["name"] == "demo" else os.cpu_count() or 1
        prepare.ensure_prepared(d["name"], d["data_dir"], variant=d["variant"],
                                source=d["source"], workers=workers)
    except (FileNotFoundError, ValueError) as e:
      if isinstance(e, prepare.PrepareError) and e.report.skipped:
        log.warning("%s", e.report.summary())
      error = e
  sharding.barrier("dataset prepared")
  if jax.process_index() > 0:
    from infd_jax.data import sources  # pylint: disable=g-import-not-at-top
    wanted = [pipeline.stage_config(config.data, stage) for stage in stages]
    if not all(sources.is_prepared(d["data_dir"], d["name"], c) for d in wanted
               for c in prepare.configs_needed(d["name"], d["variant"])):
      raise UserError(f"the dataset in {config.data.data_dir} is not prepared: process 0 "
                      "failed to prepare it (see its log)")
  if error is not None:
    raise UserError(str(error)) from error


@contextlib.contextmanager
def _stage_writer(config: ml_collections.ConfigDict, workdir: epath.Path,
                  stage: str) -> Iterator[writers.MetricWriter]:
  """Log + TensorBoard writer of one stage: its own run in `<workdir>/<stage>/`."""
  writer = writers.create_writer(workdir / stage, just_logging=jax.process_index() > 0)
  writer.write_hparams({k: str(v) for k, v in config.to_dict().items()
                        if not isinstance(v, dict)} | {"config": config.to_json_best_effort()})
  try:
    yield writer
  finally:
    writer.close()


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
        overrides: Iterable[str] = ()) -> None:
  """Runs `config.stage` in `workdir` (created if needed; a local path or a URL such as gs://).

  Later stages take the architecture of trained stages from their checkpoints;
  `overrides` (dotted keys set on the command line) that contradict them stop.
  """
  config_checks.check_config(config, os.fspath(workdir))  # before anything is read or built
  workdir = paths.absolute(workdir)
  config = trained.adopt_architecture(config, workdir, overrides)
  config_checks.check_config(config, os.fspath(workdir), adopted=True)
  mesh = sharding.make_mesh(*config_checks.check_devices(
      config, jax.device_count(), jax.process_count(), jax.default_backend(),
      jax.config.jax_enable_x64))
  workdir.mkdir(parents=True, exist_ok=True)
  log.info("process %d/%d, %d local / %d global devices, mesh %s", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count(), dict(mesh.shape))
  log.info("config:\n%s", config)
  if config.stage in ("ae", "dm", "all"):
    for stage in ("ae", "dm") if config.stage == "all" else (config.stage,):
      trained.check_resume(config, workdir, stage)
    _prepare_data(config, workdir)
  if config.stage == "t2i_unet":
    _prepare_data(config, workdir)
    from infd_jax.training import loop, t2i_task  # pylint: disable=g-import-not-at-top
    with _stage_writer(config, workdir, t2i_task.NAME) as writer:
      loop.train(config, workdir, t2i_task.make_task(config, workdir, mesh), mesh, writer)
  if config.stage in ("ae", "all"):
    from infd_jax.training import ae_task, loop  # pylint: disable=g-import-not-at-top
    with _stage_writer(config, workdir, "ae") as writer:
      loop.train(config, workdir, ae_task.make_task(config, mesh), mesh, writer)
  if config.stage in ("dm", "all"):
    from infd_jax.training import dm_task, loop  # pylint: disable=g-import-not-at-top
    with _stage_writer(config, workdir, "dm") as writer:
      loop.train(config, workdir, dm_task.make_task(config, workdir, mesh), mesh, writer)
  if config.stage == "all":  # sample what was just trained (its learned latent scale included)
    config = trained.adopt_architecture(config, workdir, job="sample")
  if config.stage in ("sample", "all"):
    from infd_jax import generate  # pylint: disable=g-import-not-at-top
    out = generate.run(config, workdir, mesh)
    print(f"infd_jax: samples in {out}")
  if config.stage == "all" and config.contact_sheet:
    from infd_jax.evaluation import contact_sheet  # pylint: disable=g-import-not-at-top
    sheet, numbers = contact_sheet.run(config, workdir, mesh)
    print(f"infd_jax: contact sheet {sheet}")
    print("infd_jax: " + ", ".join(f"{k} {v:.2f} dB" for k, v in numbers.items()))
  if config.stage == "t2i":
    from infd_jax import generate  # pylint: disable=g-import-not-at-top
    out = generate.run_t2i(config, workdir, mesh)
    print(f"infd_jax: text-to-image samples in {out}")
  if config.stage == "condition":
    from infd_jax.guidance import job as condition_job  # pylint: disable=g-import-not-at-top
    out = condition_job.run(config, workdir, mesh)
    print(f"infd_jax: guided samples in {out}")
  if config.stage == "eval":
    from infd_jax.evaluation import job  # pylint: disable=g-import-not-at-top
    with _stage_writer(config, workdir, "eval") as writer:
      job.run(config, workdir, mesh, writer)
  print(f"infd_jax: {config.stage} done; checkpoints, TensorBoard events and outputs in {workdir}")
