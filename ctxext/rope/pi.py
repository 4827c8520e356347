"""Position interpolation (Chen et al. 2023, arXiv:2306.15595): positions squeezed by ``factor``.

``inv_freq' = inv_freq / factor``: position ``n`` of the extended model is rotated as position ``n / factor`` of
the original. transformers' native form: ``rope_type: linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ctxext.rope.registry import MethodConfig, RopeContext, RopeState, param, register_method


@register_method
@dataclass(frozen=True)
class PIConfig(MethodConfig):
    factor: float = param(help="extension factor s = new context / old context; every frequency is divided by it", gt=0)
    name: ClassVar[str] = "pi"
    role: ClassVar[str] = "rescale"
    takes_factor: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "Chen et al. 2023, Extending Context Window of LLMs via Positional Interpolation (arXiv:2306.15595)"
    )

    def transform(self, state: RopeState, ctx: RopeContext) -> RopeState:
        return RopeState(state.inv_freq / self.factor, state.attention_factor)

    def native(self, ctx: RopeContext) -> dict[str, Any]:
        return {"rope_type": "linear", "factor": float(self.factor)}
