"""Sliding-window perplexity (Press et al. 2022 protocol) at a given context length.

For a document of ``n >= length`` tokens, windows of ``length`` tokens start every ``stride`` tokens; each window
scores only the tokens the previous window did not, so every token is scored at most once, with at least
``length - stride`` tokens of context once past the first window. A window's own first token has no context in
it and is never scored (with ``stride == length``, non-overlapping windows, that drops one token per window,
exactly like transformers' ``labels=input_ids`` loss per window). The last window is shifted back to end at the
document's end. Documents shorter than ``length`` are skipped and counted,
never padded into the score. Perplexity = exp(total NLL / tokens scored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ctxext.errors import DataError, EvalError


@dataclass(frozen=True)
class PerplexityResult:
    length: int
    stride: int
    perplexity: float
    nll_sum: float
    tokens_scored: int
    documents_scored: int
    documents_skipped: int

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window of a document of ``n`` tokens; targets are ``[first_scored, end)``."""
    if n < length:
        return []
    spans, scored_until, begin = [], 1, 0
    while scored_until < n:
        begin = min(begin, n - length)
        end = begin + length
        spans.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        begin += stride
    return spans


LOGITS_CHUNK = 1024  # positions per LM-head chunk: [chunk, vocab] fp32 logits at most, never [length, vocab]


@torch.no_grad()
def window_nll(
    model,
    ids: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = LOGITS_CHUNK,
    *,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token NLL of ``ids [B, L]`` against ``targets [B, L-1]`` (-100 ignored), fp32, without grad
    (``summed_nll``)."""
    return summed_nll(model, ids, targets, chunk, position_ids=position_ids)


def summed_nll(
    model,
    ids: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = LOGITS_CHUNK,
    *,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token NLL of ``ids [B, L]`` against ``targets [B, L-1]`` (-100 ignored), fp32; under grad it
    backpropagates into whatever the forward depends on except the LM head's weight (``ctxext search --refine``:
    the rope frequencies).

    ``position_ids [B, L]`` (default ``0 .. L-1``) may jump ahead (PoSE-style windows); an all-ones mask then keeps
    transformers from reading the jumps as packed documents.

    The decoder body runs once and the LM head + cross-entropy run ``chunk`` positions at a time
    (``ctxext.train.loss.linear_cross_entropy``), so full ``[L, vocab]`` logits never exist; same numbers as
    ``F.cross_entropy(model(ids).logits[:, :-1].float(), ...)``. A model without a plain linear head falls back to that.
    """
    from torch import nn

    from ctxext.models import causal_lm, decoder_body, lm_head, logit_softcap
    from ctxext.train.loss import linear_cross_entropy

    lm = causal_lm(model)  # any module whose forward returns .logits is scored too (scripts/compare_encodings.py)
    head = lm_head(model) if hasattr(lm, "lm_head") and hasattr(lm, "model") else None
    positions = {} if position_ids is None else {"position_ids": position_ids, "attention_mask": torch.ones_like(ids)}
    if type(head) is nn.Linear and head.bias is None:
        hidden = decoder_body(model)(input_ids=ids, use_cache=False, **positions).last_hidden_state[:, :-1]
        softcap = logit_softcap(lm.config)
        # the weight detached: parameters keep requires_grad under no_grad, and linear_cross_entropy would compute
        # its grad (under no_grad the hidden states need no detaching: they carry no graph)
        return linear_cross_entropy(
            hidden.flatten(0, 1), head.weight.detach(), targets.flatten(), chunk=chunk, softcap=softcap
        )
    logits = model(input_ids=ids, **positions).logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )


@torch.no_grad()
def position_nll(model, ids: torch.Tensor, chunk: int = LOGITS_CHUNK) -> torch.Tensor:
    """Next-token NLL at every position of ``ids [B, L]``: ``[B, L - 1]`` fp32, entry ``t`` scores token ``t + 1``.

    For perplexity by position (``scripts/real_model_leaderboard.py``): one forward over the whole input, the LM
    head run ``chunk`` positions at a time as in ``window_nll``, so ``[L, vocab]`` logits never exist.
    """
    from torch import nn

    from ctxext.models import causal_lm, decoder_body, lm_head, logit_softcap

    head, targets = lm_head(model), ids[:, 1:]
    if type(head) is not nn.Linear or head.bias is not None:
        logits = model(input_ids=ids).logits[:, :-1].float()
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    hidden = decoder_body(model)(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    softcap = logit_softcap(causal_lm(model).config)
    nll = torch.empty(targets.shape, dtype=torch.float32, device=ids.device)
    for s in range(0, targets.shape[1], chunk):
        logits = (hidden[:, s : s + chunk] @ head.weight.T).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        picked = logits.gather(-1, targets[:, s : s + chunk, None]).squeeze(-1)
        nll[:, s : s + chunk] = torch.logsumexp(logits, dim=-1) - picked
    return nll


@torch.no_grad()
def perplexity(
    model,
    documents: Sequence[Sequence[int]],
    length: int,
    stride: int | None = None,
    *,
    batch_size: int = 1,
    progress: bool = True,
    max_documents: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on token-id ``documents`` at context ``length`` (see the module docstring)."""
    stride = stride or length
    if not 0 < stride <= length:
        raise EvalError(f"stride={stride!r} is invalid; valid range: 0 < stride <= length ({length})")
    device = next(model.parameters()).device
    usable = [d for d in documents if len(d) >= length]
    skipped = len(documents) - len(usable)
    if max_documents is not None:
        usable = usable[:max_documents]
    jobs = [(doc, span) for doc in usable for span in windows(len(doc), length, stride)]
    nll, count = 0.0, 0
    bar = tqdm(range(0, len(jobs), batch_size), desc=f"ppl@{length}", disable=not progress, leave=False)
    for start in bar:
        batch = jobs[start : start + batch_size]
        ids = torch.tensor([doc[b:e] for doc, (b, e, _) in batch], device=device)
        labels = ids.clone()
        for row, (_, (b, _, first)) in enumerate(batch):
            labels[row, : first - b] = -100
        targets = labels[:, 1:]
        nll += window_nll(model, ids, targets).item()
        count += int((targets != -100).sum())
    if count == 0:
        raise DataError(f"no document has at least {length} tokens ({skipped} skipped); use longer documents")
    return PerplexityResult(length, stride, math.exp(nll / count), nll, count, len(usable), skipped)
