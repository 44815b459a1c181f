"""Stage runners of the R1 recipe; `r1jax.recipe` chains them."""
