"""Next-token cross-entropy through the LM head without ever holding full-sequence logits.

``linear_cross_entropy(hidden, weight, targets, chunk)`` equals ``F.cross_entropy(hidden @ weight.T, targets,
reduction="sum")`` (fp32 logits, ``-100`` targets ignored, optional per-target weights and Gemma-style logit
soft-capping) but works
``chunk`` rows at a time and computes each chunk's gradients during the forward pass, so neither pass keeps more
than ``[chunk, vocab]`` fp32 logits and nothing is recomputed. Backward only scales the stored gradients.
"""

from __future__ import annotations

import torch


def _chunk_loss(h, weight, t, w, softcap: float | None, grad_hidden, grad_weight) -> torch.Tensor:
    """Summed NLL of one chunk (each target's term times ``w`` when given); writes its gradients into
    ``grad_hidden`` (a view of the chunk's rows) and adds them to ``grad_weight``. Its [chunk, vocab] buffers die
    when it returns, before the next chunk's exist."""
    logits = (h @ weight.T).float()
    if softcap:
        tanh = logits.div_(softcap).tanh_()
        logits = tanh * softcap
    valid = (t != -100).float()
    if w is not None:
        valid = valid * w
    safe = t.clamp(min=0)
    # log-softmax and its gradient in place: one [chunk, vocab] buffer and one exp pass (torch.logsumexp would
    # add two temporaries of that size, and the softmax a second exp)
    logits.sub_(logits.amax(dim=-1, keepdim=True))
    target_logit = logits.gather(1, safe[:, None]).squeeze(1)
    sum_exp = logits.exp_().sum(dim=-1)
    nll = ((sum_exp.log() - target_logit) * valid).sum()
    if grad_hidden is None and grad_weight is None:
        return nll
    grad = logits.div_(sum_exp[:, None])  # softmax; d loss / d logits = softmax - onehot
    grad[torch.arange(len(t), device=t.device), safe] -= 1.0
    grad *= valid[:, None]
    if softcap:
        grad *= tanh.square_().neg_().add_(1)  # d softcap*tanh(x/softcap) / dx, in place
    if grad_hidden is not None:
        grad_hidden.copy_(grad.to(weight.dtype) @ weight)
    if grad_weight is not None:
        grad_weight.addmm_(grad.T, h.float())
    return nll


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, target_weights, chunk: int, softcap: float | None):
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            rows = slice(s, s + chunk)
            w = target_weights[rows] if target_weights is not None else None
            total += _chunk_loss(
                hidden[rows],
                weight,
                targets[rows],
                w,
                softcap,
                grad_hidden[rows] if grad_hidden is not None else None,
                grad_weight,
            )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk: int = 1024,
    softcap: float | None = None,
    target_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden [N, H] @ weight[V, H].T`` against ``targets [N]``, each target's term times
    ``target_weights [N]`` when given (see the module doc)."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, target_weights, chunk, softcap)


class ChunkedLMLoss(torch.nn.Module):
    """Wraps a (PEFT) causal LM; ``forward(input_ids)`` returns the summed next-token NLL of the block.

    The decoder runs once; the LM head and cross-entropy run ``chunk`` positions at a time
    (``linear_cross_entropy``: gradients computed chunk by chunk in the forward pass), so at most ``[chunk, vocab]``
    fp32 logits exist at any moment and nothing is recomputed.
    """

    def __init__(self, model: torch.nn.Module, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    @property
    def _no_split_modules(self) -> list[str]:
        """The decoder layer classes: accelerate's FSDP2 wraps these one by one."""
        from ctxext.models import causal_lm

        return list(causal_lm(self.model)._no_split_modules or [])

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``labels``: targets already shifted (``labels[:, i]`` is the token after ``input_ids[:, i]``, -100 to
        ignore), for a block split along the sequence (context parallel); default: the block's next tokens.
        ``weights``: each target's weight in the sum, shaped like the targets (``labels``, else
        ``input_ids[:, 1:]``); default 1."""
        from torch.nn import functional as F
        from torch.utils.checkpoint import checkpoint

        from ctxext.models import causal_lm, decoder_body, lm_head, logit_softcap

        # with position ids that jump (PoSE) and neither a mask nor a cache, transformers reads the block as packed
        # documents and masks each chunk off from the others: an all-ones mask keeps it one causal sequence
        mask = torch.ones_like(input_ids) if position_ids is not None else None
        hidden = decoder_body(self.model)(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        if labels is None:
            hidden, targets = hidden[:, :-1], input_ids[:, 1:]
        else:
            targets = labels
        head = lm_head(self.model)
        softcap = logit_softcap(causal_lm(self.model).config)
        if type(head) is torch.nn.Linear and head.bias is None:
            return linear_cross_entropy(
                hidden.flatten(0, 1),
                head.weight,
                targets.flatten(),
                chunk=self.chunk,
                softcap=softcap,
                target_weights=weights.flatten().float() if weights is not None else None,
            )

        # an adapted or biased head (e.g. LoRA on lm_head): chunks under activation checkpointing instead
        def chunk_nll(h, t, w):
            logits = head(h).float()
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            nll = F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none")
            return (nll * w.flatten()).sum() if w is not None else nll.sum()

        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, targets.shape[1], self.chunk):
            cols = slice(s, s + self.chunk)
            w = weights[:, cols].float() if weights is not None else None
            total = total + checkpoint(chunk_nll, hidden[:, cols], targets[:, cols], w, use_reentrant=False)
        return total
