"""`python -m infd_jax.view PATH`: the deep-zoom viewer (see `cli.py`)."""

from infd_jax.view import cli

if __name__ == "__main__":
  cli.run()
