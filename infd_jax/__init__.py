"""infd_jax: Image Neural Field Diffusion Models in JAX/Flax."""
