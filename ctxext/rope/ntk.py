"""NTK-aware scaling (bloc97, 2023; analysed in Peng et al. 2023, arXiv:2309.00071 section 3.1).

The base is raised so that the lowest frequency is interpolated by ``factor`` while the highest is kept:
``theta' = theta * factor ** (d / (d - 2))``. On frequencies that are not plain RoPE, the same change is the
per-pair multiplier ``factor ** (-2 i / (d - 2))``. transformers' native form: ``rope_type: default`` with the
new ``rope_theta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .spec import RopeContext, RopeState, check_positive, register_method


@register_method
@dataclass(frozen=True)
class NTKConfig:
    """Args:
    factor: extension factor s; the base becomes theta * s ** (d / (d - 2)).
    """

    factor: float
    name: ClassVar[str] = "ntk"
    kind: ClassVar[str] = "rescale"
    paper: ClassVar[str] = "bloc97 2023, NTK-Aware Scaled RoPE (as formalised in Peng et al. 2023, arXiv:2309.00071)"

    def __post_init__(self) -> None:
        check_positive(self.name, "factor", self.factor)

    def theta(self, ctx: RopeContext) -> float:
        d = ctx.head_dim
        return ctx.rope_theta * self.factor ** (d / (d - 2))

    def apply(self, state: RopeState, ctx: RopeContext) -> RopeState:
        i = torch.arange(ctx.num_pairs, dtype=torch.float64)
        multiplier = torch.tensor(float(self.factor), dtype=torch.float64) ** (-2.0 * i / (ctx.head_dim - 2))
        return RopeState(state.inv_freq * multiplier, state.attention_factor)
