"""Diffusion math: schedules, the forward process and losses, samplers and ODE solvers."""

# The samplers and time-step spacings of `samplers.sample`, importable without jax
# (the config checks read them).
SAMPLERS = ("ddim", "dpmpp_2m", "unipc")
SPACINGS = ("uniform", "logsnr", "quadratic")
