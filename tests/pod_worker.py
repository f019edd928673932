"""One process of the pod tests: runs real stages through `jobs.run` on the tiny config.

Usage: python -m tests.pod_worker WORKDIR DATA_DIR STAGES AE_STEPS DM_STEPS
           [COORDINATOR NUM_PROCESSES PROCESS_ID]
STAGES is a comma list (ae,dm). Process 0 saves the final parameters of each stage
(ae: generator and discriminator; dm: parameters and EMA) as `<WORKDIR>/params_<stage>.npz`
(flattened leaves, global arrays gathered), with the state's step and rng. Validation runs
after every step, except stage 2's on one process, which no test reads (the pod test reads
stage 2's on two).
"""

import logging
import sys

import jax


def main(argv: list[str]) -> None:
  workdir, data_dir, stages, ae_steps, dm_steps = argv[1:6]
  logging.basicConfig(level=logging.INFO)  # the loop's "resumed from step N" and warnings
  logging.getLogger("absl").setLevel(logging.WARNING)  # not orbax's per-save chatter
  if len(argv) > 6:
    jax.distributed.initialize(coordinator_address=argv[6], num_processes=int(argv[7]),
                               process_id=int(argv[8]), cluster_detection_method="deactivate")
    from tests import processes  # pylint: disable=g-import-not-at-top
    processes.cache_compiles_of_every_process()
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top  (after distributed init)
  from infd_jax import checkpointing, jobs, sharding, trained  # pylint: disable=g-import-not-at-top
  from infd_jax.training import ae_task, dm_task, loop  # pylint: disable=g-import-not-at-top

  for stage in stages.split(","):
    c = tiny.get_config()
    c.stage = stage
    c.data.update(data_dir=data_dir, eval_split="train")  # 9 records: shares of 5 and 4
    c.train.update(ae_steps=int(ae_steps), dm_steps=int(dm_steps), eval_batches=0, ckpt_every=1,
                   eval_every=int(stage == "ae" or jax.process_count() > 1))
    jobs.run(c, workdir)
    init = (ae_task if stage == "ae" else dm_task).init_fn(c)
    abstract, _, _ = loop.initial_state(init, sharding.make_mesh(-1, 1), (), 0)
    _, state = checkpointing.Checkpointer(trained.stage_dir(workdir, stage),
                                          read_only=True).restore(abstract)
    params = (state.gen_params, state.disc_params) if stage == "ae" else (state.params,
                                                                           state.ema_params)
    gather = lambda tree: [np.asarray(multihost_utils.process_allgather(x, tiled=True))
                           for x in jax.tree.leaves(tree)]
    leaves, (step,), rng = gather(params), gather(state.step), gather(state.rng)
    if jax.process_index() == 0:
      np.savez(f"{workdir}/params_{stage}.npz", *leaves, step=step, rng=rng[0])


if __name__ == "__main__":
  main(sys.argv)
