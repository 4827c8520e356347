"""p-RoPE, low-frequency removal (Barbero et al. 2024, Round and Round We Go!, arXiv:2410.06205).

Keep the ``k = round(keep * d / 2)`` highest-frequency rotation pairs (indices ``0 .. k-1``) and set the other
``inv_freq`` entries to 0: those pairs get cos 1, sin 0 and carry no position, so they cannot be pushed out of
distribution by longer contexts. transformers' native form: ``rope_type: proportional`` with
``partial_rotary_factor = (2 k + 1) / d`` (``2 k / d`` can round down to ``k - 1`` in floating point).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ctxext.errors import MethodError
from ctxext.rope.registry import MethodConfig, RopeContext, RopeState, param, register_method


@register_method
@dataclass(frozen=True)
class PRopeConfig(MethodConfig):
    keep: float = param(help="fraction of rotation pairs kept, highest frequencies first", gt=0, le=1)
    name: ClassVar[str] = "prope"
    role: ClassVar[str] = "filter"
    paper: ClassVar[str] = (
        "Barbero et al. 2024, Round and Round We Go! What makes Rotary Positional Encodings useful? (arXiv:2410.06205)"
    )

    def kept_pairs(self, ctx: RopeContext) -> int:
        k = round(self.keep * ctx.num_pairs)
        if k < 1:
            raise MethodError(
                f"prope: keep={self.keep!r} keeps 0 of {ctx.num_pairs} rotation pairs for head_dim {ctx.head_dim}; "
                f"valid range: {1 / ctx.num_pairs:.4g} <= keep <= 1"
            )
        return k

    def transform(self, state: RopeState, ctx: RopeContext) -> RopeState:
        inv_freq = state.inv_freq.clone()
        inv_freq[self.kept_pairs(ctx) :] = 0.0
        return RopeState(inv_freq, state.attention_factor)

    def native(self, ctx: RopeContext) -> dict[str, Any]:
        # int(p * d // 2) must give exactly k: (2k + 1) / d is safe where 2k / d can round down.
        # (prope+pi goes to the universal form: transformers warns about `factor` on proportional at every load.)
        return {"rope_type": "proportional", "partial_rotary_factor": (2 * self.kept_pairs(ctx) + 1) / ctx.head_dim}
