"""Position interpolation (Chen et al. 2023, arXiv:2306.15595): positions squeezed by ``factor``.

``inv_freq' = inv_freq / factor``: position ``n`` of the extended model is rotated as position ``n / factor`` of
the original. transformers' native form: ``rope_type: linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .spec import RopeContext, RopeState, check_positive, register_method


@register_method
@dataclass(frozen=True)
class PIConfig:
    """Args:
    factor: extension factor s = new context / old context; every frequency is divided by it.
    """

    factor: float
    name: ClassVar[str] = "pi"
    kind: ClassVar[str] = "rescale"
    paper: ClassVar[str] = "Chen et al. 2023, Extending Context Window of LLMs via Positional Interpolation (arXiv:2306.15595)"

    def __post_init__(self) -> None:
        check_positive(self.name, "factor", self.factor)

    def apply(self, state: RopeState, ctx: RopeContext) -> RopeState:
        return RopeState(state.inv_freq / self.factor, state.attention_factor)
