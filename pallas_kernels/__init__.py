"""Pallas kernels for r1jax: FP8 block-scaled GEMM, grouped (expert) matmul, fused MoE router.

  from pallas_kernels import fp8, gmm, routing

Each module has a `BlockSizes` dataclass, kernel entry points taking `interpret=None` (None:
interpret on CPU, compile elsewhere) and plain-jnp `*_reference` oracles.
"""

from pallas_kernels import fp8, gmm, routing

__all__ = ["fp8", "gmm", "routing"]
