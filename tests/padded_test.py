"""Host-consistent padded passes: equal batch counts on every process, each record once."""


import numpy as np
import pytest

from infd_jax.data import padded


@pytest.mark.parametrize("n,processes,local_batch", [(9, 2, 4), (8, 2, 4), (5, 4, 1), (17, 3, 2),
                                                     (3, 1, 8)])
def test_every_record_counts_once_and_hosts_agree(n, processes, local_batch):
  count = padded.num_batches(n, processes, local_batch)
  seen = []
  for p in range(processes):
    examples = ({"id": np.int64(i)} for i in padded.share(n, p, processes))
    batches = list(padded.padded_batches(examples, local_batch=local_batch, count=count))
    assert len(batches) == count  # the same number of jitted calls on every process
    for b in batches:
      assert b["id"].shape == b[padded.MASK].shape == (local_batch,)
      seen += b["id"][b[padded.MASK]].tolist()
  assert sorted(seen) == list(range(n))
  # No whole batch of padding on the largest share: the count is the minimum that fits.
  assert (count - 1) * local_batch < -(-n // processes) <= count * local_batch


def test_too_many_examples_is_an_error():
  with pytest.raises(ValueError, match="more than 1 x 2"):
    list(padded.padded_batches(({"x": np.zeros(1)} for _ in range(3)), local_batch=2, count=1))


def test_masked_mean_equals_the_mean_over_records():
  values = np.arange(9, dtype=np.float64) ** 2
  count = padded.num_batches(9, 2, 4)
  total = weight = 0.0
  for p in range(2):
    for b in padded.padded_batches(({"v": values[i]} for i in padded.share(9, p, 2)),
                                   local_batch=4, count=count):
      total += float(np.sum(b["v"] * b[padded.MASK]))
      weight += float(np.sum(b[padded.MASK]))
  assert total / weight == pytest.approx(values.mean())
