"""Independent float64 references, written from the papers' formulas (and, where the paper defers to it, the
authors' released code). Nothing here imports ctxext or transformers: tests compare the library against these.

Layout: Hugging Face half-split pairs, pair i = (i, i + d/2), i = 0 .. d/2 - 1, entry 0 = highest frequency.
"""

import math

import torch

F64 = torch.float64


def rope_inv_freq(d: int, theta: float) -> torch.Tensor:
    """Su et al. 2021 (RoFormer): theta_i = base^(-2i/d)."""
    return torch.tensor([theta ** (-2.0 * i / d) for i in range(d // 2)], dtype=F64)


def pi(inv_freq: torch.Tensor, s: float) -> torch.Tensor:
    """Chen et al. 2023: f'(x, m) = f(x, m L / L') -> every frequency divided by s = L'/L."""
    return inv_freq / s


def ntk(d: int, theta: float, s: float) -> torch.Tensor:
    """NTK-aware: base' = base * s^(d / (d - 2))."""
    return rope_inv_freq(d, theta * s ** (d / (d - 2)))


def dynamic(d: int, theta: float, L: int, n: int, factor: float = 1.0) -> torch.Tensor:
    """Dynamic NTK at sequence length n: alpha = factor * n / L - (factor - 1) for n > L, else plain."""
    n = max(n, L)
    alpha = factor * n / L - (factor - 1)
    return rope_inv_freq(d, theta * alpha ** (d / (d - 2)))


def yarn(
    d: int, theta: float, L: int, s: float, beta_fast: float = 32, beta_slow: float = 1
) -> tuple[torch.Tensor, float]:
    """Peng et al. 2023, "NTK-by-parts" + temperature, ramp over the pair index as in the released code.

    Pair i completes r_i = L / lambda_i rotations over the trained context, lambda_i = 2 pi theta^(2i/d).
    Solving r_i = r for i: i(r) = d ln(L / (2 pi r)) / (2 ln theta). Pairs below floor(i(beta_fast)) keep their
    frequency, pairs above ceil(i(beta_slow)) are divided by s, linear in i in between. sqrt(1/t) = 0.1 ln s + 1.
    """
    base = rope_inv_freq(d, theta)

    def index_of(r):
        return d * math.log(L / (2 * math.pi * r)) / (2 * math.log(theta))

    lo = max(math.floor(index_of(beta_fast)), 0)
    hi = min(math.ceil(index_of(beta_slow)), d - 1)
    out = torch.empty_like(base)
    for i in range(d // 2):
        interpolate = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: keep, 1: divide by s
        out[i] = base[i] * (1 - interpolate) + base[i] / s * interpolate
    return out, 0.1 * math.log(s) + 1.0


def llama3(inv_freq: torch.Tensor, L: int, factor: float, low: float = 1.0, high: float = 4.0) -> torch.Tensor:
    """Meta's Llama 3.1 apply_scaling: by wavelength against L / high and L / low."""
    out = []
    for f in inv_freq.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < L / high:
            out.append(f)
        elif wavelen > L / low:
            out.append(f / factor)
        else:
            smooth = (L / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=F64)


def prope(inv_freq: torch.Tensor, kept: int) -> torch.Tensor:
    """Barbero et al. 2024: keep the `kept` highest frequencies, zero the rest."""
    out = inv_freq.clone()
    out[kept:] = 0.0
    return out


def cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0):
    """cos/sin [len(positions), d] for the half-split layout (cat of the pair angles twice)."""
    angles = positions.to(F64)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def xpos_zeta(d: int) -> torch.Tensor:
    """Sun et al. 2022: zeta_i = (2i + 0.4 d) / (1.4 d)."""
    return torch.tensor([(2 * i + 0.4 * d) / (1.4 * d) for i in range(d // 2)], dtype=F64)


def xpos_attention(q, k, v, q_positions, k_positions, scale_base: float, scaling: float, mask=None):
    """Attention where pair i of q.k is multiplied by zeta_i^((n - m) / scale_base) (n query, m key position).

    q: [H, Q, D], k/v: [H, K, D] (already rotated). Causal on positions; `mask` [Q, K] bool may restrict more.
    Computed directly on the distance, with no centring, in float64, one query at a time.
    """
    d = q.shape[-1]
    z = xpos_zeta(d).repeat(2)  # half-split: the pair's two dimensions share zeta_i
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=F64)
    for t in range(q.shape[1]):
        dist = (q_positions[t] - k_positions).to(F64)  # [K]
        decay = z[None, :] ** (dist[:, None] / scale_base)  # [K, D]
        logits = torch.einsum("hd,hkd,kd->hk", q[:, t].to(F64), k.to(F64), decay) * scaling
        allowed = dist >= 0 if mask is None else mask[t] & (dist >= 0)
        logits = logits.masked_fill(~allowed, float("-inf"))
        out[:, t] = torch.einsum("hk,hkd->hd", torch.softmax(logits, -1), v.to(F64))
    return out


def rotate(x, positions, inv_freq):
    """RoPE on x [..., S, D] (half-split) at `positions` [S], float64: x cos + rotate_half(x) sin."""
    cos, sin = cos_sin(inv_freq, positions)
    x = x.to(F64)
    n = inv_freq.numel()
    half = torch.cat((-x[..., n:], x[..., :n]), dim=-1)
    return x * cos + half * sin


def selfextend_positions(i: int, j: int, group_size: int, window: int) -> int:
    """Jin et al. 2024 (LLM Maybe LongLM), eq. for the relative position of query i and key j:
    i - j inside the neighbour window, floor(i/G) - floor(j/G) + (W - floor(W/G)) beyond it."""
    if i - j < window:
        return i - j
    return i // group_size - j // group_size + (window - window // group_size)


def selfextend_attention(
    q,
    k,
    v,
    q_positions,
    k_positions,
    inv_freq,
    group_size: int,
    window: int,
    scaling: float,
    mask=None,
    softcap=None,
    group_bias=0.0,
):
    """Self-Extend on UNrotated q [H, Q, D], k/v [H, K, D]: an explicit float64 score matrix where the score of
    (i, j) is <rotate(q_i, r_ij), k_j> with the piecewise relative position r_ij (RoPE: <R(m) q, R(n) k> =
    <R(m - n) q, k>). Causal on positions; `mask` [Q, K] bool may restrict more; `softcap` as Gemma 2; `group_bias`
    is added to the (soft-capped) logit of every key at distance >= window."""
    q_positions, k_positions = [int(p) for p in q_positions], [int(p) for p in k_positions]
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=F64)
    for t, i in enumerate(q_positions):
        logits = torch.full((q.shape[0], len(k_positions)), float("-inf"), dtype=F64)
        for s, j in enumerate(k_positions):
            if j > i or (mask is not None and not mask[t, s]):
                continue
            r = selfextend_positions(i, j, group_size, window)
            qr = rotate(q[:, t : t + 1], torch.tensor([r]), inv_freq)[:, 0]  # [H, D]
            score = (qr * k[:, s].to(F64)).sum(-1) * scaling
            logits[:, s] = (softcap * torch.tanh(score / softcap) if softcap else score) + (
                group_bias if i - j >= window else 0.0
            )
        out[:, t] = torch.einsum("hk,hkd->hd", torch.softmax(logits, -1), v.to(F64))
    return out
