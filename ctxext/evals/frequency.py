"""RoPE frequency usage (Barbero et al. 2024, "Round and Round We Go!", arXiv:2410.06205).

For every layer, head and rotation pair (half-split: pair i = dims (i, i + d/2)) the mean norm of the query and
key 2-D chunks over real inputs. A rotation never changes a chunk's norm, so this measures how much each
frequency *can* contribute to attention logits. v has no rotation and serves as a control: a structure seen in
q/k but not in v comes from how the model uses RoPE. Low-frequency pairs with large norms are the "semantic
channels" the paper describes; p-RoPE removes the rotation of the lowest frequencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ctxext.errors import DataError
from ctxext.models.base import attention_modules, head_dim_of, layer_inv_freq, qkv_modules


@dataclass
class FrequencyUsage:
    """Mean pair norms ``[layers, heads, pairs]`` for q, k (after any q/k norm) and v, plus the frequencies."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    inv_freq: np.ndarray  # [layers, pairs]
    context_length: int
    tokens: int

    def qk_energy(self) -> np.ndarray:
        """``[layers, pairs]``: mean over heads of q-norm x k-norm (each query head with its kv head)."""
        group = self.q.shape[1] // self.k.shape[1]
        k = np.repeat(self.k, group, axis=1)
        return (self.q * k).mean(axis=1)

    def to_dict(self) -> dict:
        return {
            "q": self.q.tolist(),
            "k": self.k.tolist(),
            "v": self.v.tolist(),
            "inv_freq": self.inv_freq.tolist(),
            "context_length": self.context_length,
            "tokens": self.tokens,
        }


def _pair_norms(x: torch.Tensor) -> torch.Tensor:
    """``[..., H, D] -> [H, D/2]`` summed over the leading dims."""
    half = x.shape[-1] // 2
    norms = torch.sqrt(x[..., :half].float() ** 2 + x[..., half:].float() ** 2)
    return norms.reshape(-1, *norms.shape[-2:]).sum(0)


@torch.no_grad()
def frequency_usage(
    model,
    documents: list[list[int]],
    *,
    seq_len: int = 256,
    max_tokens: int = 16384,
    batch_size: int = 4,
    progress: bool = True,
) -> FrequencyUsage:
    """Measure pair norms on windows of ``seq_len`` tokens cut from ``documents`` (up to ``max_tokens``)."""
    head_dim = head_dim_of(model.config)
    stream = [t for doc in documents for t in doc]
    n_windows = min(len(stream) // seq_len, max(1, max_tokens // seq_len))
    if n_windows == 0:
        raise DataError(f"need at least {seq_len} tokens of data, got {len(stream)}")
    windows = torch.tensor(stream[: n_windows * seq_len]).view(n_windows, seq_len)
    attns = attention_modules(model)
    sums: dict[tuple[str, int], torch.Tensor] = {}

    def hook(kind: str, layer: int):
        def fn(module, inputs, output):
            # projections give [B, S, H * D]; q_norm / k_norm (Qwen3, Gemma 3) give [B, S, H, D]
            x = output.view(*output.shape[:2], -1, head_dim) if output.dim() == 3 else output
            sums[(kind, layer)] = sums.get((kind, layer), 0) + _pair_norms(x).cpu()

        return fn

    handles = []
    for i, attn in enumerate(attns):
        q_mod, k_mod, v_mod = qkv_modules(attn)
        handles += [
            q_mod.register_forward_hook(hook("q", i)),
            k_mod.register_forward_hook(hook("k", i)),
            v_mod.register_forward_hook(hook("v", i)),
        ]
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, n_windows, batch_size), desc="frequency usage", disable=not progress, leave=False):
            model(input_ids=windows[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    tokens = n_windows * seq_len
    stack = {kind: np.stack([(sums[(kind, i)] / tokens).numpy() for i in range(len(attns))]) for kind in "qkv"}
    inv_freq = np.stack([f.numpy() for f in layer_inv_freq(model)])
    return FrequencyUsage(
        stack["q"], stack["k"], stack["v"], inv_freq, int(model.config.max_position_embeddings), tokens
    )


def suggest_keep(usage: FrequencyUsage, context_length: int | None = None) -> tuple[float, list[str]]:
    """Suggested ``prope`` keep, with the reasoning as printable lines.

    Rule: a pair whose wavelength exceeds the trained context never completes a rotation in training, so its
    angle is out of distribution at any longer length; Barbero et al. show such low frequencies act as semantic
    channels that p-RoPE frees from position. Keep the pairs that rotate at least once within the context
    (rounded to whole pairs, at least a quarter). For Gemma-7B-like shapes (d 256, theta 1e4, 8k) this gives
    0.78, next to the paper's best 0.75.
    """
    L = context_length or usage.context_length
    inv = usage.inv_freq.mean(axis=0)
    pairs = inv.shape[0]
    with np.errstate(divide="ignore"):
        wavelength = np.where(inv > 0, 2 * math.pi / inv, np.inf)
    long = wavelength > L
    energy = usage.qk_energy().mean(axis=0)
    share_long = float(energy[long].sum() / energy.sum()) if energy.sum() > 0 else 0.0
    kept = max(int((~long).sum()), math.ceil(pairs / 4))
    keep = kept / pairs
    top = np.argsort(-energy)[:5]
    lines = [
        (
            f"{int(long.sum())} of {pairs} rotation pairs have a wavelength above the trained context {L} "
            f"(pairs {int(np.argmax(long)) if long.any() else pairs}..{pairs - 1}); "
            "they never complete a rotation in training."
        ),
        f"Those pairs carry {share_long:.0%} of the q.k norm product (mean over layers and heads); "
        + (
            "a large share: they act as semantic channels, which p-RoPE keeps as position-free channels."
            if share_long >= 0.2
            else "a small share: removing their rotation costs little."
        ),
        "Largest q.k norm products at pairs "
        + ", ".join(f"{int(i)} (wavelength {wavelength[i]:.0f})" for i in top)
        + ".",
        f"Suggested: --method prope --keep {keep:.4g} (keeps the {kept} highest-frequency pairs"
        + (", floored at a quarter of the pairs)." if kept > int((~long).sum()) else ")."),
    ]
    return keep, lines
