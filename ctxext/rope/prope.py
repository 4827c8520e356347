"""p-RoPE, low-frequency removal (Barbero et al. 2024, Round and Round We Go!, arXiv:2410.06205).

Keep the ``k = round(keep * d / 2)`` highest-frequency rotation pairs (indices ``0 .. k-1``) and set the other
``inv_freq`` entries to 0: those pairs get cos 1, sin 0 and carry no position, so they cannot be pushed out of
distribution by longer contexts. transformers' native form: ``rope_type: proportional`` with
``partial_rotary_factor = (2 k + 1) / d`` (``2 k / d`` can round down to ``k - 1`` in floating point).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .spec import MethodError, RopeContext, RopeState, check_fraction, register_method


@register_method
@dataclass(frozen=True)
class PRopeConfig:
    """Args:
    keep: fraction of rotation pairs to keep, highest frequencies first; 0 < keep <= 1.
    """

    keep: float
    name: ClassVar[str] = "prope"
    kind: ClassVar[str] = "mask"
    paper: ClassVar[str] = "Barbero et al. 2024, Round and Round We Go! What makes Rotary Positional Encodings useful? (arXiv:2410.06205)"

    def __post_init__(self) -> None:
        check_fraction(self.name, "keep", self.keep)

    def kept_pairs(self, ctx: RopeContext) -> int:
        k = round(self.keep * ctx.num_pairs)
        if k < 1:
            raise MethodError(
                f"prope: keep={self.keep!r} keeps 0 of {ctx.num_pairs} rotation pairs for head_dim {ctx.head_dim}; "
                f"valid range: {1 / ctx.num_pairs:.4g} <= keep <= 1"
            )
        return k

    def apply(self, state: RopeState, ctx: RopeContext) -> RopeState:
        inv_freq = state.inv_freq.clone()
        inv_freq[self.kept_pairs(ctx):] = 0.0
        return RopeState(inv_freq, state.attention_factor)
