"""Self-Extend (Jin et al. 2024, LLM Maybe LongLM, arXiv:2401.01325): grouped positions beyond a neighbour window.

For query position ``i`` and key position ``j`` (distance ``d = i - j >= 0``) the relative position seen by RoPE is

* ``d`` when ``d < window`` (neighbour attention: exact positions);
* ``floor(i / G) - floor(j / G) + (window - floor(window / G))`` otherwise (grouped attention; ``G`` = group size).

Both sets of scores share one softmax. With a trained context ``L`` the largest relative position stays below
``L`` up to about ``(L - window) * G + window`` tokens: that is the context the method reaches.

Implementation (exact, on SDPA): attention receives ``q``/``k`` already rotated at their own positions ``p``.
Rotating them again by ``floor(p / G) + shift - p`` (queries) and ``floor(p / G) - p`` (keys) with the layer's
``inv_freq`` gives the grouped ``q``/``k`` (a rotation composes additively; cos/sin multipliers such as YaRN's
attention factor are already in ``q`` and ``k``). One softmax over both score sets is one SDPA call on
concatenated features: queries ``[q, q_grouped]``, neighbour keys ``[k, 0]``, grouped keys ``[0, k_grouped]`` so
``q' . k'`` is the neighbour score on the first set and the grouped score on the second, and a boolean mask picks
``d < window`` in the first and ``d >= window`` in the second. Queries go in blocks of ``BLOCK``: a block sees the
neighbour keys of its window plus the grouped keys before it, so peak memory stays near plain SDPA's.

Positions follow the slots of the KV cache: query ``t`` of ``Q`` sits at slot ``K - Q + t`` of the ``K`` keys.
When the model passes ``position_ids`` (``generate`` does, counting only unpadded tokens) the positions are the
slots shifted by each row's offset, so a left-padded row groups exactly as the same row alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import MethodError
from .registry import MethodConfig, RopeContext, RopeState, param, register_method

BLOCK = 256  # queries per block


@register_method
@dataclass(frozen=True)
class SelfExtendConfig(MethodConfig):
    group_size: int = param(help="G: beyond the window, positions are floor-divided by G (the paper uses 2-16)", ge=2)
    window: int = param(help="W: neighbour window; distances below it keep exact positions (must be below the "
                        "trained context; the paper uses 512-2048 for 4k models)", ge=1)
    group_bias: float = param(0.0, help="added to every grouped attention logit (not in the paper: 0); a negative "
                              "value gives the G keys that share each grouped position less of the softmax "
                              "(docs/SELFEXTEND.md)", le=0)
    name: ClassVar[str] = "selfextend"
    role: ClassVar[str] = "attention"
    paper: ClassVar[str] = "Jin et al. 2024, LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning (arXiv:2401.01325)"
    needs_rotary: ClassVar[bool] = True  # attention() also gets the layer's inv_freq and the queries' positions

    @property
    def shift(self) -> int:
        """``window - floor(window / G)``: makes the grouped positions continue the neighbour ones at ``d = window``."""
        return int(self.window) - int(self.window) // int(self.group_size)

    def reach(self, context_length: int, target_length: int | None = None) -> int:
        """``(L - W) * G + W``: the longest input whose relative positions all stay below the context ``L``."""
        G, W = int(self.group_size), int(self.window)
        if W >= context_length:
            raise MethodError(f"selfextend: window={W} must be below the context {context_length} (the window keeps "
                              f"exact positions; grouping starts beyond it); try window={max(1, context_length // 4)}")
        reach = (context_length - W) * G + W
        if target_length is not None and target_length > reach:
            need = -(-(target_length - W) // (context_length - W))
            raise MethodError(f"selfextend: target_length={target_length} is beyond the {reach} tokens that "
                              f"group_size={G}, window={W} reach on context {context_length} ((L - W) * G + W); "
                              f"use group_size >= {need} or a smaller window")
        return reach

    def transform(self, state: RopeState, ctx: RopeContext) -> RopeState:
        self.reach(ctx.context_length)  # refuse a window that does not fit the trained context
        return state  # frequencies unchanged; the grouping lives in attention

    def attention(self, query, key, value, attention_mask, *, scaling, dropout, softcap, inv_freq=None,
                  positions=None):
        if inv_freq is None:
            raise RuntimeError("selfextend attention needs the layer's inv_freq (the ctxext attention adapter passes it)")
        return selfextend_attention(query, key, value, attention_mask, group_size=int(self.group_size),
                                    window=int(self.window), inv_freq=inv_freq, positions=positions, scaling=scaling,
                                    dropout=dropout, softcap=softcap, group_bias=float(self.group_bias))


def rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the half-split pairs of ``x`` ``[..., S, D]`` by ``angle`` ``[B|1, S, n_pairs]`` (float64 angles).

    Only the first ``2 * n_pairs`` features rotate (partial rotary); the rest pass through."""
    n = angle.shape[-1]
    cos = torch.cat((angle.cos(), angle.cos()), -1).to(x.dtype)[:, None]  # [B, 1, S, 2n]
    sin = torch.cat((angle.sin(), angle.sin()), -1).to(x.dtype)[:, None]
    rot, rest = x[..., : 2 * n], x[..., 2 * n:]
    half = torch.cat((-rot[..., n:], rot[..., :n]), -1)
    return torch.cat((rot * cos + half * sin, rest), -1) if rest.shape[-1] else rot * cos + half * sin


def selfextend_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    group_size: int,
    window: int,
    inv_freq: torch.Tensor,
    positions: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    group_bias: float = 0.0,
    block: int = BLOCK,
) -> torch.Tensor:
    """Causal Self-Extend attention on already-rotated ``query`` ``[B, H, Q, D]`` and ``key``/``value``
    ``[B, Hkv, K, D]``.

    ``inv_freq``: the frequencies ``q``/``k`` were rotated with (``[n_pairs]``). ``positions``: the queries'
    position ids ``[B|1, Q]`` (None: the slots ``K - Q + t``); keys sit at their slot minus the row's offset.
    ``attention_mask``: boolean ``[B|1, 1|H, Q, K]`` (True = attend) or None (causal). ``group_bias`` is added to
    every grouped logit (after soft-capping). Returns ``[B, Q, H, D]``.
    """
    bsz, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    device = query.device
    scale = scaling if scaling is not None else head_dim**-0.5
    G, W = group_size, window
    shift = W - W // G
    q_slots = torch.arange(k_len - q_len, k_len, device=device)
    if positions is None:
        offset = torch.zeros(1, 1, dtype=torch.long, device=device)
    else:  # per row: slot - position of the last query (generate: number of left pads)
        offset = (k_len - 1 - positions[:, -1:].long()).to(device)
    q_pos = q_slots[None, :] - offset  # [B|1, Q]
    k_pos = torch.arange(k_len, device=device)[None, :] - offset  # [B|1, K]
    freq = inv_freq.to(device=device, dtype=torch.float64)
    q_delta = (torch.div(q_pos, G, rounding_mode="floor") + shift - q_pos).double()
    k_delta = (torch.div(k_pos, G, rounding_mode="floor") - k_pos).double()
    q_group = rotate(query, q_delta[..., None] * freq)
    k_group = rotate(key, k_delta[..., None] * freq)
    if kv_heads != heads and softcap is not None:
        key, k_group = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, k_group))
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    out = torch.empty(bsz, heads, q_len, value.shape[-1], dtype=query.dtype, device=device)
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        first, last = int(q_slots[start]), int(q_slots[stop - 1])  # slots of the block's queries
        n_lo = max(first - W + 1, 0)  # neighbour keys: slots [n_lo, last]
        g_hi = max(last - W + 1, 0)  # grouped keys: slots [0, g_hi)
        dist_n = q_slots[start:stop, None] - torch.arange(n_lo, last + 1, device=device)[None, :]
        dist_g = q_slots[start:stop, None] - torch.arange(0, g_hi, device=device)[None, :]
        mask_n, mask_g = (dist_n >= 0) & (dist_n < W), dist_g >= W
        if attention_mask is not None:
            mask_n = mask_n & attention_mask[..., start:stop, n_lo:last + 1]
            mask_g = mask_g & attention_mask[..., start:stop, :g_hi]
        if softcap is not None:  # logit soft-capping (Gemma 2) needs explicit scores
            s_n = torch.matmul(query[:, :, start:stop].float(), key[:, :, n_lo:last + 1].float().transpose(-1, -2))
            s_g = torch.matmul(q_group[:, :, start:stop].float(), k_group[:, :, :g_hi].float().transpose(-1, -2))
            scores = torch.cat((s_n, s_g), -1) * scale
            scores = softcap * torch.tanh(scores / softcap)
            scores[..., s_n.shape[-1]:] += group_bias
            mask = torch.cat((mask_n.expand(*scores.shape[:2], -1, -1), mask_g.expand(*scores.shape[:2], -1, -1)), -1)
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
            probs = F.dropout(probs, p=dropout, training=dropout > 0)
            vb = torch.cat((value[:, :, n_lo:last + 1], value[:, :, :g_hi]), 2)
            out[:, :, start:stop] = torch.matmul(probs.to(vb.dtype), vb)
            continue
        qb = torch.cat((query[:, :, start:stop], q_group[:, :, start:stop]), -1)  # [B, H, b, 2D]
        kn = key[:, :, n_lo:last + 1]
        kg = k_group[:, :, :g_hi]
        kb = torch.cat((torch.cat((kn, torch.zeros_like(kn)), -1), torch.cat((torch.zeros_like(kg), kg), -1)), 2)
        vb = torch.cat((value[:, :, n_lo:last + 1], value[:, :, :g_hi]), 2)
        lead = torch.broadcast_shapes(mask_n.shape[:-2], mask_g.shape[:-2])
        mask = torch.cat((mask_n.expand(*lead, -1, -1), mask_g.expand(*lead, -1, -1)), -1)
        if group_bias:  # an additive float mask: -inf where masked, the bias on the grouped keys
            bias = torch.zeros(mask.shape[-1], dtype=query.dtype, device=device)
            bias[mask_n.shape[-1]:] = group_bias
            mask = bias.masked_fill(~mask, float("-inf"))
        out[:, :, start:stop] = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=kv_heads != heads
        )
    return out.transpose(1, 2).contiguous()
