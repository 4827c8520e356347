"""YaRN (Peng et al. 2023, arXiv:2309.00071): "NTK-by-parts" interpolation plus attention temperature.

For pair ``i`` let ``r_i = L / lambda_i`` be the number of rotations it makes over the trained context. Pairs that
rotate fewer than ``beta_slow`` times are interpolated (divided by ``factor``), pairs rotating more than
``beta_fast`` times are kept, and a linear ramp mixes the two in between. As in the authors' released code (and
transformers' ``rope_type: yarn``), the ramp runs over the pair index between the (floored / ceiled) indices
where ``r = beta_fast`` and ``r = beta_slow``:
``dim(r) = d * ln(L / (2 pi r)) / (2 ln theta)``. cos and sin are multiplied by ``0.1 ln(factor) + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ctxext.errors import MethodError
from ctxext.rope.registry import MethodConfig, RopeContext, RopeState, param, register_method


@register_method
@dataclass(frozen=True)
class YaRNConfig(MethodConfig):
    factor: float = param(help="extension factor s", gt=0)
    beta_fast: float = param(
        32.0, help="pairs with more than this many rotations over the trained context are kept", gt=0
    )
    beta_slow: float = param(
        1.0, help="pairs with fewer rotations over the trained context are fully interpolated", gt=0
    )
    attention_factor: float | None = param(
        None, help="cos/sin multiplier (None: 0.1 ln s + 1, the paper's sqrt(1/t))", gt=0
    )
    name: ClassVar[str] = "yarn"
    role: ClassVar[str] = "rescale"
    takes_factor: ClassVar[bool] = True
    paper: ClassVar[str] = "Peng et al. 2023, YaRN: Efficient Context Window Extension of LLMs (arXiv:2309.00071)"

    def check(self) -> None:
        if self.beta_fast <= self.beta_slow:
            raise MethodError(
                f"yarn: beta_fast={self.beta_fast!r} must be greater than beta_slow={self.beta_slow!r} "
                "(defaults 32 and 1)"
            )

    def resolved_attention_factor(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0

    def ramp(self, ctx: RopeContext) -> torch.Tensor:
        """Per pair: 0 = fully interpolated, 1 = kept (float64)."""
        d, base, L = ctx.head_dim, ctx.rope_theta, ctx.context_length

        def dim_of(rotations: float) -> float:
            return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(dim_of(self.beta_fast)), 0)
        high = min(math.ceil(dim_of(self.beta_slow)), d - 1)
        if low == high:
            high += 0.001
        i = torch.arange(ctx.num_pairs, dtype=torch.float64)
        return 1.0 - ((i - low) / (high - low)).clamp(0.0, 1.0)

    def transform(self, state: RopeState, ctx: RopeContext) -> RopeState:
        keep = self.ramp(ctx)
        inv_freq = state.inv_freq / self.factor * (1 - keep) + state.inv_freq * keep
        return RopeState(inv_freq, state.attention_factor * self.resolved_attention_factor())

    def native(self, ctx: RopeContext) -> dict[str, Any]:
        return {
            "rope_type": "yarn",
            "rope_theta": float(ctx.rope_theta),
            "factor": float(self.factor),
            "beta_fast": float(self.beta_fast),
            "beta_slow": float(self.beta_slow),
            "attention_factor": self.resolved_attention_factor(),
            "original_max_position_embeddings": int(ctx.context_length),
        }
