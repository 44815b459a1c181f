"""r1jax: the DeepSeek-R1 training system in pure JAX."""

__version__ = "0.1.0"
