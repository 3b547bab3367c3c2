"""Shared pytest configuration."""

import jax

# Tests compare against formulas to float tolerance; keep JAX's default float32 but make
# matmuls exact enough to compare on CPU.
jax.config.update("jax_default_matmul_precision", "highest")
