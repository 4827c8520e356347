"""xPos (Sun et al. 2022, A Length-Extrapolatable Transformer, arXiv:2212.10554): RoPE with a distance decay.

Per rotation pair ``i`` (half-split layout), ``zeta_i = (2 i + 0.4 d) / (1.4 d)``. The query at position ``n`` is
scaled by ``zeta ** ((n - c) / scale_base)`` and the key at ``m`` by ``zeta ** (-(m - c) / scale_base)``, so each
pair's contribution to ``q . k`` is multiplied by ``zeta ** ((n - m) / scale_base)``: it decays with distance.

The centre ``c`` cancels in ``q . k`` and only sets the size of the factors. A fixed centre overflows fp32 beyond
about 40k positions (``0.2857 ** (-L / 512)``) and half precision far sooner. Here the queries are processed in
blocks of ``BLOCK`` and ``c`` is the position of the block's first query: query factors stay in
``[zeta ** (BLOCK / scale_base), 1]``, the keys of the block are scaled by at most ``zeta ** (-BLOCK / scale_base)``
and keys far in the past decay toward 0, as the method intends. Scaling happens in fp32.

Positions are slot distances: query ``t`` of ``Q`` sits at slot ``K - Q + t`` of the ``K`` keys (a growing KV
cache or a full forward), so left padding, right padding and cached decoding all see the same relative distances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ctxext.rope.registry import MethodConfig, param, register_method

BLOCK = 256  # queries per block; bounds every scale factor by zeta ** (-BLOCK / scale_base)


@register_method
@dataclass(frozen=True)
class XPosConfig(MethodConfig):
    scale_base: float = param(
        512.0, help="decay scale gamma: pair i is damped by zeta_i ** (distance / gamma) (512 in the paper)", gt=0
    )
    name: ClassVar[str] = "xpos"
    role: ClassVar[str] = "attention"
    paper: ClassVar[str] = "Sun et al. 2022, A Length-Extrapolatable Transformer (arXiv:2212.10554)"

    # frequencies unchanged (transform is the identity); the decay lives in attention
    def attention(self, query, key, value, attention_mask, *, scaling, dropout, softcap):
        return xpos_attention(
            query,
            key,
            value,
            attention_mask,
            scale_base=float(self.scale_base),
            scaling=scaling,
            dropout=dropout,
            softcap=softcap,
        )


def xpos_zeta(head_dim: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``zeta_i = (2 i + 0.4 d) / (1.4 d)`` for the ``head_dim // 2`` rotation pairs."""
    i = torch.arange(head_dim // 2, dtype=dtype, device=device)
    return (2 * i + 0.4 * head_dim) / (1.4 * head_dim)


def _causal_mask(q_slots: torch.Tensor, k_len: int) -> torch.Tensor:
    return torch.arange(k_len, device=q_slots.device)[None, :] <= q_slots[:, None]


def xpos_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scale_base: float,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    block: int = BLOCK,
) -> torch.Tensor:
    """Causal attention with the xPos decay on already-rotated ``query`` ``[B, H, Q, D]`` and ``key``/``value``
    ``[B, Hkv, K, D]``. ``attention_mask``: boolean ``[B|1, 1|H, Q, K]`` (True = attend) or None (causal).

    Returns the attention output ``[B, Q, H, D]`` in the dtype of ``query``.
    """
    bsz, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    log_zeta = torch.log(xpos_zeta(head_dim, device=query.device)).repeat(2) / scale_base  # half-split: cat((z, z))
    offset = k_len - q_len  # slot of query 0
    slots = torch.arange(k_len, device=query.device, dtype=torch.float32)
    qf, kf = query.float(), key.float()
    if kv_heads != heads and softcap is not None:
        kf = kf.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    out = torch.empty(bsz, heads, q_len, head_dim, dtype=query.dtype, device=query.device)
    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        centre = offset + start
        k_end = offset + stop  # causal: no query of this block sees a later slot
        q_scale = torch.exp((slots[centre:k_end] - centre)[:, None] * log_zeta)
        k_scale = torch.exp(-(slots[:k_end] - centre)[:, None] * log_zeta)
        qb = (qf[:, :, start:stop] * q_scale).to(query.dtype)
        kb = (kf[:, :, :k_end] * k_scale).to(key.dtype)
        vb = value[:, :, :k_end]
        if attention_mask is None:
            mask = _causal_mask(torch.arange(centre, k_end, device=query.device), k_end)
        else:
            mask = attention_mask[..., start:stop, :k_end]
        if softcap is None:
            out[:, :, start:stop] = F.scaled_dot_product_attention(
                qb, kb, vb, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=kv_heads != heads
            )
        else:  # logit soft-capping (Gemma 2) needs explicit scores
            scores = torch.matmul(qb.float(), kb.float().transpose(-1, -2)) * (scaling or head_dim**-0.5)
            scores = softcap * torch.tanh(scores / softcap)
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            probs = F.dropout(probs, p=dropout, training=dropout > 0)
            out[:, :, start:stop] = torch.matmul(probs.to(vb.dtype), vb)
    return out.transpose(1, 2).contiguous()
