"""Guided sampling: conditions on boxes of virtual images, the guided sampler, the job."""

# Condition kinds (`conditions.Condition`), importable without jax (the config checks read them).
KINDS = ("low_res", "known", "text")
