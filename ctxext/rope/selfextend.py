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

On CPU (no soft-capping, no dropout, no gradient) a cheaper exact split of the same softmax: for a block of
queries, every key more than ``window`` before its first query is grouped for all of them, so those keys go through
one unmasked SDPA call on the grouped ``q``/``k`` alone (half the features, the fast path) that also returns its
log-sum-exp; the band of the last ``window + block`` keys, where the two position sets meet, is scored explicitly;
the two partial softmaxes are merged by their log-sum-exps. 1.6-2.0x plain SDPA's time at 4k-16k instead of
3.1-4.4x, at plain SDPA's peak memory (docs/results/benchmarks/selfextend.md). Only the CPU kernel of SDPA returns the
log-sum-exp (and that one no gradient), so other devices and training keep the concatenated form.

Positions follow the slots of the KV cache: query ``t`` of ``Q`` sits at slot ``K - Q + t`` of the ``K`` keys.
When the model passes ``position_ids`` (``generate`` does, counting only unpadded tokens) the positions are the
slots shifted by each row's offset, so a left-padded row groups exactly as the same row alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ctxext.errors import MethodError
from ctxext.rope.registry import MethodConfig, RopeContext, RopeState, param, register_method

BLOCK = 256  # queries per block


@register_method
@dataclass(frozen=True)
class SelfExtendConfig(MethodConfig):
    group_size: int = param(help="G: beyond the window, positions are floor-divided by G (the paper uses 2-16)", ge=2)
    window: int = param(
        help="W: neighbour window; distances below it keep exact positions (must be below the "
        "trained context; the paper uses 512-2048 for 4k models)",
        ge=1,
    )
    group_bias: float = param(
        0.0,
        help="added to every grouped attention logit (not in the paper: 0); a negative "
        "value gives the G keys that share each grouped position less of the softmax "
        "(docs/results/SELFEXTEND.md)",
        le=0,
    )
    name: ClassVar[str] = "selfextend"
    role: ClassVar[str] = "attention"
    paper: ClassVar[str] = (
        "Jin et al. 2024, LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning (arXiv:2401.01325)"
    )
    needs_rotary: ClassVar[bool] = True  # attention() also gets the layer's inv_freq and the queries' positions

    @property
    def shift(self) -> int:
        """``window - floor(window / G)``: makes the grouped positions continue the neighbour ones at ``d = window``."""
        return int(self.window) - int(self.window) // int(self.group_size)

    def reach(self, context_length: int, target_length: int | None = None) -> int:
        """``(L - W) * G + W``: the longest input whose relative positions all stay below the context ``L``."""
        G, W = int(self.group_size), int(self.window)
        if W >= context_length:
            raise MethodError(
                f"selfextend: window={W} must be below the context {context_length} (the window keeps "
                f"exact positions; grouping starts beyond it); try window={max(1, context_length // 4)}"
            )
        reach = (context_length - W) * G + W
        if target_length is not None and target_length > reach:
            need = -(-(target_length - W) // (context_length - W))
            raise MethodError(
                f"selfextend: target_length={target_length} is beyond the {reach} tokens that "
                f"group_size={G}, window={W} reach on context {context_length} ((L - W) * G + W); "
                f"use group_size >= {need} or a smaller window"
            )
        return reach

    def transform(self, state: RopeState, ctx: RopeContext) -> RopeState:
        self.reach(ctx.context_length)  # refuse a window that does not fit the trained context
        return state  # frequencies unchanged; the grouping lives in attention

    def attention(self, query, key, value, attention_mask, *, scaling, dropout, softcap, inv_freq=None, positions=None):
        if inv_freq is None:
            raise RuntimeError(
                "selfextend attention needs the layer's inv_freq (the ctxext attention adapter passes it)"
            )
        return selfextend_attention(
            query,
            key,
            value,
            attention_mask,
            group_size=int(self.group_size),
            window=int(self.window),
            inv_freq=inv_freq,
            positions=positions,
            scaling=scaling,
            dropout=dropout,
            softcap=softcap,
            group_bias=float(self.group_bias),
        )


def rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the half-split pairs of ``x`` ``[..., S, D]`` by ``angle`` ``[B|1, S, n_pairs]`` (float64 angles).

    Only the first ``2 * n_pairs`` features rotate (partial rotary); the rest pass through."""
    n = angle.shape[-1]
    cos = torch.cat((angle.cos(), angle.cos()), -1).to(x.dtype)[:, None]  # [B, 1, S, 2n]
    sin = torch.cat((angle.sin(), angle.sin()), -1).to(x.dtype)[:, None]
    rot, rest = x[..., : 2 * n], x[..., 2 * n :]
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
    kernel: str = "auto",
) -> torch.Tensor:
    """Causal Self-Extend attention on already-rotated ``query`` ``[B, H, Q, D]`` and ``key``/``value``
    ``[B, Hkv, K, D]``.

    ``inv_freq``: the frequencies ``q``/``k`` were rotated with (``[n_pairs]``). ``positions``: the queries'
    position ids ``[B|1, Q]`` (None: the slots ``K - Q + t``); keys sit at their slot minus the row's offset.
    ``attention_mask``: boolean ``[B|1, 1|H, Q, K]`` (True = attend) or None (causal). ``group_bias`` is added to
    every grouped logit (after soft-capping). ``kernel``: ``split`` (log-sum-exp merge; CPU, no soft-capping, no
    dropout, no autograd), ``joint`` (concatenated features; anywhere) or ``auto`` (split where it applies). Returns
    ``[B, Q, H, D]``.
    """
    if kernel not in ("auto", "split", "joint"):
        raise ValueError(f"kernel={kernel!r}; valid: auto, split, joint")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    split_applies = (
        softcap is None
        and not dropout
        and not needs_grad
        and query.device.type == "cpu"
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )
    if kernel == "split" and not split_applies:  # (the CPU kernel's log-sum-exp has no gradient)
        raise ValueError("the split Self-Extend kernel needs CPU tensors, no soft-capping, no dropout and no autograd")
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
    if split_applies and kernel != "joint":
        return _split_kernel(
            query,
            key,
            value,
            q_group,
            k_group,
            attention_mask,
            q_slots,
            window=W,
            scale=scale,
            group_bias=group_bias,
            block=block,
        )
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
            mask_n = mask_n & attention_mask[..., start:stop, n_lo : last + 1]
            mask_g = mask_g & attention_mask[..., start:stop, :g_hi]
        if softcap is not None:  # logit soft-capping (Gemma 2) needs explicit scores
            s_n = torch.matmul(query[:, :, start:stop].float(), key[:, :, n_lo : last + 1].float().transpose(-1, -2))
            s_g = torch.matmul(q_group[:, :, start:stop].float(), k_group[:, :, :g_hi].float().transpose(-1, -2))
            scores = torch.cat((s_n, s_g), -1) * scale
            scores = softcap * torch.tanh(scores / softcap)
            scores[..., s_n.shape[-1] :] += group_bias
            mask = torch.cat((mask_n.expand(*scores.shape[:2], -1, -1), mask_g.expand(*scores.shape[:2], -1, -1)), -1)
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
            probs = F.dropout(probs, p=dropout, training=dropout > 0)
            vb = torch.cat((value[:, :, n_lo : last + 1], value[:, :, :g_hi]), 2)
            out[:, :, start:stop] = torch.matmul(probs.to(vb.dtype), vb)
            continue
        qb = torch.cat((query[:, :, start:stop], q_group[:, :, start:stop]), -1)  # [B, H, b, 2D]
        kn = key[:, :, n_lo : last + 1]
        kg = k_group[:, :, :g_hi]
        kb = torch.cat((torch.cat((kn, torch.zeros_like(kn)), -1), torch.cat((torch.zeros_like(kg), kg), -1)), 2)
        vb = torch.cat((value[:, :, n_lo : last + 1], value[:, :, :g_hi]), 2)
        lead = torch.broadcast_shapes(mask_n.shape[:-2], mask_g.shape[:-2])
        mask = torch.cat((mask_n.expand(*lead, -1, -1), mask_g.expand(*lead, -1, -1)), -1)
        if group_bias:  # an additive float mask: -inf where masked, the bias on the grouped keys
            bias = torch.zeros(mask.shape[-1], dtype=query.dtype, device=device)
            bias[mask_n.shape[-1] :] = group_bias
            mask = bias.masked_fill(~mask, float("-inf"))
        out[:, :, start:stop] = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=kv_heads != heads
        )
    return out.transpose(1, 2).contiguous()


def _split_kernel(
    query,
    key,
    value,
    q_group,
    k_group,
    attention_mask,
    q_slots,
    *,
    window: int,
    scale: float,
    group_bias: float,
    block: int,
) -> torch.Tensor:
    """``selfextend_attention``'s CPU kernel (module docstring): per block, the keys grouped for every query in one
    unmasked SDPA call with its log-sum-exp, the band where the two position sets meet scored explicitly (float32),
    the two merged. Query heads are folded onto their key/value head (``[B, Hkv, rep * b, D]``), so GQA copies
    nothing."""
    bsz, heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    W = window
    out = torch.empty(bsz, heads, q_len, value.shape[-1], dtype=query.dtype, device=query.device)

    def per_kv_head(mask):  # [B|1, 1|H, b, n] -> [B|1, Hkv|1, rep|1, b, n]
        if mask.shape[1] == heads:
            return mask.unflatten(1, (kv_heads, rep))
        return mask.unsqueeze(2)

    for start in range(0, q_len, block):
        stop = min(start + block, q_len)
        b = stop - start
        first, last = int(q_slots[start]), int(q_slots[stop - 1])
        lo = max(first - W + 1, 0)  # keys [0, lo): more than the window before every query of the block
        q5 = query[:, :, start:stop].unflatten(1, (kv_heads, rep)).float()  # [B, Hkv, rep, b, D]
        qg5 = q_group[:, :, start:stop].unflatten(1, (kv_heads, rep))
        # the band, keys [lo, last]: neighbour scores below the window, grouped ones at and beyond it
        dist = q_slots[start:stop, None] - torch.arange(lo, last + 1, device=query.device)[None, :]
        scores = torch.matmul(q5, key[:, :, None, lo : last + 1].float().transpose(-1, -2)).mul_(scale)
        grouped = torch.matmul(qg5.float(), k_group[:, :, None, lo : last + 1].float().transpose(-1, -2))
        scores = torch.where(dist < W, scores, grouped.mul_(scale).add_(group_bias))
        del grouped
        keep = dist >= 0
        if attention_mask is not None:
            keep = keep & per_kv_head(attention_mask[..., start:stop, lo : last + 1])
        scores.masked_fill_(~keep, float("-inf"))
        lse_band = torch.logsumexp(scores, -1)  # [B, Hkv, rep, b]; -inf: no key in the band
        probs = scores.sub_(lse_band[..., None]).exp_().nan_to_num_(0.0)
        o_band = torch.matmul(probs, value[:, :, None, lo : last + 1].float())
        del scores, probs
        if lo == 0:
            out[:, :, start:stop] = o_band.flatten(1, 2).to(out.dtype)
            continue
        # keys [0, lo): grouped for every query of the block (one SDPA call, half the joint kernel's features)
        mask = visible = None
        if attention_mask is not None:
            visible = per_kv_head(attention_mask[..., start:stop, :lo]).expand(-1, kv_heads, rep, -1, -1)
            mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~visible, float("-inf")
            )
            mask = mask.flatten(2, 3)
        o_far, lse_far = _sdpa_with_lse(qg5.flatten(2, 3), k_group[:, :, :lo], value[:, :, :lo], mask, scale)
        o_far = o_far.unflatten(2, (rep, b)).float()
        lse_far = lse_far.unflatten(2, (rep, b)).float() + group_bias
        if visible is not None:  # the kernel gives a row with every key masked a log-sum-exp of 0, not -inf
            lse_far = lse_far.masked_fill(~visible.any(-1), float("-inf"))
        top = torch.maximum(lse_far, lse_band)
        w_far, w_band = torch.exp(lse_far - top).nan_to_num(0.0), torch.exp(lse_band - top).nan_to_num(0.0)
        total = w_far + w_band  # 0: a query that sees no key at all (a left pad), whose output is 0 as in SDPA
        merged = (w_far[..., None] * o_far + w_band[..., None] * o_band) / total.clamp_min(1e-30)[..., None]
        out[:, :, start:stop] = merged.flatten(1, 2).to(out.dtype)
    return out.transpose(1, 2).contiguous()


def _sdpa_with_lse(query, key, value, mask, scale):
    """SDPA that also returns the log-sum-exp of its scores (``[B, H, Q]``): PyTorch's CPU flash kernel."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.contiguous(), key.contiguous(), value.contiguous(), 0.0, False, attn_mask=mask, scale=scale
    )
