"""Reference position encodings and a small Llama-style model to train with each, from scratch.

Separate from the patchers: these exist to *measure* how each classic encoding extrapolates
(``scripts/compare_encodings.py``). All use the Hugging Face half-split pair layout where pairs matter.

  * ``sinusoidal`` (Vaswani et al. 2017): PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...), added to
    the token embeddings;
  * ``learned`` (Gehring et al. 2017; GPT): a trained table of ``max_len`` position vectors, added; positions beyond
    the table are clamped to its last row (it cannot represent them at all);
  * ``rope`` (Su et al. 2021): q and k rotated by ``pos * theta^(-2i/d)``;
  * ``alibi`` (Press et al. 2022): no embedding; the logit of query i for key j gets ``-slope_h * (i - j)``;
  * ``xpos`` (Sun et al. 2022): RoPE plus the distance decay of ``ctxext.rope.xpos``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ctxext.rope.xpos import xpos_attention

ENCODINGS = ("sinusoidal", "learned", "rope", "alibi", "xpos")


def sinusoidal_table(n_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """``[n_positions, dim]``: even dims sin(pos / base^(2i/dim)), odd dims cos of the same angle."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    i = torch.arange(dim // 2, dtype=torch.float64)[None, :]
    angle = pos / base ** (2 * i / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = angle.sin(), angle.cos()
    return table.float()


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al.: ``2^(-8 i / n)`` for i = 1..n when n is a power of two; otherwise the slopes of the closest
    smaller power of two, then every other slope of twice that power (the paper's reference code)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest])


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate ``x [..., S, D]`` by RoPE at ``positions [S]`` (half-split pairs)."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat((-x2, x1), -1) * sin


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, encoding: str, scale_base: float):
        super().__init__()
        self.heads, self.encoding, self.scale_base = heads, encoding, scale_base
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        hidden = int(8 * dim / 3)
        self.gate, self.up, self.down = (
            nn.Linear(dim, hidden, bias=False),
            nn.Linear(dim, hidden, bias=False),
            nn.Linear(hidden, dim, bias=False),
        )
        if encoding == "alibi":
            self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        pos = torch.arange(s, device=x.device)
        if self.encoding in ("rope", "xpos"):
            q, k = rope_rotate(q, pos), rope_rotate(k, pos)
        if self.encoding == "xpos":
            out = xpos_attention(q, k, v, None, scale_base=self.scale_base)
            return out.reshape(b, s, d)
        if self.encoding == "alibi":
            dist = (pos[:, None] - pos[None, :]).float()
            bias = -self.slopes[:, None, None] * dist
            bias = bias.masked_fill(dist < 0, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(b, s, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.out(self.attention(self.attn_norm(x)))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLM(nn.Module):
    """A pre-norm Llama-style decoder (RMSNorm, SwiGLU, tied embeddings) with a pluggable position encoding."""

    def __init__(
        self, vocab_size: int, dim: int, layers: int, heads: int, encoding: str, max_len: int, scale_base: float = 512.0
    ):
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding {encoding!r} is invalid; valid: {', '.join(ENCODINGS)}")
        self.encoding, self.max_len = encoding, max_len
        self.embed = nn.Embedding(vocab_size, dim)
        if encoding == "learned":
            self.positions = nn.Embedding(max_len, dim)
            nn.init.normal_(self.positions.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, encoding, scale_base) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        s = ids.shape[1]
        if self.encoding == "sinusoidal":  # Vaswani et al. scale the embeddings by sqrt(d) before adding
            x = x * math.sqrt(x.shape[-1]) + sinusoidal_table(s, x.shape[-1]).to(x.device)
        elif self.encoding == "learned":
            x = x + self.positions(torch.arange(s, device=ids.device).clamp(max=self.max_len - 1))
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T
