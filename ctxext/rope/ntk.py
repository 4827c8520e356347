"""NTK-aware scaling (bloc97, 2023; analysed in Peng et al. 2023, arXiv:2309.00071 section 3.1).

The base is raised so that the lowest frequency is interpolated by ``factor`` while the highest is kept:
``theta' = theta * factor ** (d / (d - 2))``. On frequencies that are not plain RoPE, the same change is the
per-pair multiplier ``factor ** (-2 i / (d - 2))``. transformers' native form: ``rope_type: default`` with the
new ``rope_theta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ctxext.rope.registry import MethodConfig, RopeContext, RopeState, param, register_method


@register_method
@dataclass(frozen=True)
class NTKConfig(MethodConfig):
    factor: float = param(help="extension factor s; the base becomes theta * s ** (d / (d - 2))", gt=0)
    name: ClassVar[str] = "ntk"
    role: ClassVar[str] = "rescale"
    takes_factor: ClassVar[bool] = True
    paper: ClassVar[str] = "bloc97 2023, NTK-Aware Scaled RoPE (as formalised in Peng et al. 2023, arXiv:2309.00071)"

    def theta(self, ctx: RopeContext) -> float:
        d = ctx.head_dim
        return ctx.rope_theta * self.factor ** (d / (d - 2))

    def transform(self, state: RopeState, ctx: RopeContext) -> RopeState:
        i = torch.arange(ctx.num_pairs, dtype=torch.float64)
        multiplier = torch.tensor(float(self.factor), dtype=torch.float64) ** (-2.0 * i / (ctx.head_dim - 2))
        return RopeState(state.inv_freq * multiplier, state.attention_factor)

    def native(self, ctx: RopeContext) -> dict[str, Any]:
        return {"rope_type": "default", "rope_theta": self.theta(ctx)}
