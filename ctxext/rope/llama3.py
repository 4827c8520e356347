"""Llama 3.1 frequency scaling (Meta 2024, The Llama 3 Herd of Models, arXiv:2407.21783).

By wavelength ``lambda = 2 pi / inv_freq`` against the trained context ``L``: wavelengths shorter than
``L / high_freq_factor`` are kept, longer than ``L / low_freq_factor`` are divided by ``factor`` (PI), and in
between ``inv_freq' = (1 - a) inv_freq / factor + a inv_freq`` with
``a = (L / lambda - low_freq_factor) / (high_freq_factor - low_freq_factor)``.
transformers' native form: ``rope_type: llama3``.
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
class Llama3Config(MethodConfig):
    factor: float = param(help="extension factor applied to the low frequencies (8 in Llama 3.1)", gt=0)
    low_freq_factor: float = param(1.0, help="wavelengths above L / low_freq_factor are fully interpolated", gt=0)
    high_freq_factor: float = param(4.0, help="wavelengths below L / high_freq_factor are kept", gt=0)
    name: ClassVar[str] = "llama3"
    role: ClassVar[str] = "rescale"
    takes_factor: ClassVar[bool] = True
    paper: ClassVar[str] = "Meta 2024, The Llama 3 Herd of Models (arXiv:2407.21783), rope_scaling 'llama3'"

    def check(self) -> None:
        if self.high_freq_factor <= self.low_freq_factor:
            raise MethodError(
                f"llama3: high_freq_factor={self.high_freq_factor!r} must be greater than "
                f"low_freq_factor={self.low_freq_factor!r} (defaults 4 and 1)"
            )

    def transform(self, state: RopeState, ctx: RopeContext) -> RopeState:
        inv_freq, L = state.inv_freq, ctx.context_length
        wavelen = 2 * math.pi / inv_freq  # inf for removed pairs: they stay 0 below
        smooth = (L / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        mixed = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        out = torch.where(wavelen > L / self.low_freq_factor, inv_freq / self.factor, mixed)
        out = torch.where(wavelen < L / self.high_freq_factor, inv_freq, out)
        return RopeState(out, state.attention_factor)

    def native(self, ctx: RopeContext) -> dict[str, Any]:
        return {
            "rope_type": "llama3",
            "rope_theta": float(ctx.rope_theta),
            "factor": float(self.factor),
            "low_freq_factor": float(self.low_freq_factor),
            "high_freq_factor": float(self.high_freq_factor),
            "original_max_position_embeddings": int(ctx.context_length),
        }
