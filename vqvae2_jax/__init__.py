"""VQ-VAE-2 in JAX/Flax."""
