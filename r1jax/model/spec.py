"""`ParamSpec`: how a parameter is declared (shape, logical axes, initializer, dtype). A leaf
module, so the family modules declare their own parameters and `params` assembles them."""

from __future__ import annotations

import dataclasses
from typing import Any

INIT_STD = 0.02  # HF initializer_range


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]  # logical axis names, one per dim
  init: str = "normal"  # "normal" | "ones" | "zeros"
  dtype: Any = None  # None = cfg.param_dtype

  def __post_init__(self):
    assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def norm(d: int) -> ParamSpec:
  return ParamSpec((d,), ("norm",), "ones")
