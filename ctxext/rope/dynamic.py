"""Dynamic NTK (emozilla, 2023): NTK-aware scaling recomputed from the sequence length at every forward.

For a forward over ``n`` positions with ``n > L`` (the trained context), the base becomes
``theta * (factor * n / L - (factor - 1)) ** (d / (d - 2))``; below ``L`` it is plain RoPE. This is the formula
of transformers' native ``rope_type: dynamic``, which reads ``max_position_embeddings`` as ``L`` (so a patch
keeps it). With ``factor = 1`` the NTK alpha is ``n / L``; larger factors scale harder (``factor = 8`` at
``n = 8 L`` gives alpha = 57). Because frequencies change with the length, a KV-cached decode differs slightly
from a full forward over the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ctxext.rope.registry import MethodConfig, RopeContext, param, register_method


@register_method
@dataclass(frozen=True)
class DynamicNTKConfig(MethodConfig):
    factor: float = param(
        1.0,
        help="transformers' dynamic `factor`: NTK alpha = factor * n / L - (factor - 1) "
        "for a forward over n > L positions (1: alpha = n / L)",
        gt=0,
    )
    name: ClassVar[str] = "dynamic"
    role: ClassVar[str] = "rescale"
    per_forward: ClassVar[bool] = True
    static_alternative: ClassVar[str] = "ntk"
    plain_source_only: ClassVar[bool] = True
    paper: ClassVar[str] = (
        "emozilla 2023, Dynamically Scaled RoPE (as formalised in Peng et al. 2023, arXiv:2309.00071)"
    )

    def alpha(self, seq_len: int, ctx: RopeContext) -> float:
        n = max(seq_len, ctx.context_length)
        return self.factor * n / ctx.context_length - (self.factor - 1)

    def inv_freq_at(self, seq_len: int, ctx: RopeContext) -> torch.Tensor:
        """float64 frequencies used for a forward over ``seq_len`` positions."""
        d = ctx.head_dim
        theta = ctx.rope_theta * self.alpha(seq_len, ctx) ** (d / (d - 2))
        i = torch.arange(ctx.num_pairs, dtype=torch.float64)
        return theta ** (-2.0 * i / d)

    # transform: the static view is the trained length's (plain RoPE); the change happens per forward

    def native(self, ctx: RopeContext) -> dict[str, Any]:
        return {"rope_type": "dynamic", "factor": float(self.factor)}
