"""The training loss: label-smoothed cross-entropy computed with the output projection, a chunk
of rows at a time, so that the ``(N, V)`` float32 logits are never held (a custom autograd
function), and ``TranslationLoss``, the model plus that loss as one module for DDP and
``torch.compile``. Training (``mtkit.train``) and validation loss (``mtkit.evaluate``) use it."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from mtkit.models import Model
from mtkit.models.decoder_only import DecoderOnly
from mtkit.vocab import MASKED_LOGIT, PAD_ID


@torch.compiler.disable  # the chunk loop's length follows the batch: compiling it would recompile each step
def smoothed_nll(hidden: Tensor, weight: Tensor, target: Tensor, smoothing: float,
                 masked: Tensor | None = None, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed cross-entropy and summed NLL of the logits ``hidden @ weight.T``
    (plus ``bias`` ``(V,)``, the output projection's where it has one) against ``target``
    ``(N,)`` (``hidden`` ``(N, d)``: padding already removed; ``weight`` ``(V, d)``: the output
    projection). Smoothing spreads ``smoothing`` of the probability mass
    uniformly over the vocabulary, as ``F.cross_entropy`` does, less the ``masked`` columns
    (ids the model must never predict: ``mtkit.vocab.MASKED_LOGIT``). Only the first value carries a
    gradient. The projection runs in the autocast dtype when autocast is on, the softmax in
    float32, as ``F.cross_entropy`` on autocast logits would."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))
    return _ProjectedCrossEntropy.apply(hidden, weight, target, smoothing, dtype, need_grad, masked, bias)


# Rows of logits handled at once: on a CPU a chunk of float32 logits fits in the L2 cache (2 MiB),
# so the softmax's passes over it run from cache; a GPU takes large chunks (fewer launches).
_CHUNK_ELEMENTS = {"cpu": 1 << 19}
_GPU_CHUNK_ELEMENTS = 1 << 25


class _ProjectedCrossEntropy(torch.autograd.Function):
    """The output projection and the loss, a chunk of rows at a time, never holding the
    ``(N, V)`` float32 logits.

    Forward computes each chunk's logits, its log-sum-exp and the gradient with respect to the
    logits, ``softmax - (1 - s) * onehot(target) - s / V``, which it keeps in the projection's
    dtype (the dtype the backward matrix products take anyway). Backward is then two matrix
    products. The smoothing term needs each row's mean logit: ``hidden @ weight.mean(0)``.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, smoothing: float, dtype: torch.dtype,
                need_grad: bool, masked: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            n, vocab = h.shape[0], w.shape[0]
            spread = vocab - (0 if masked is None else len(masked))  # columns smoothing covers
            rows = max(1, _CHUNK_ELEMENTS.get(h.device.type, _GPU_CHUNK_ELEMENTS) // vocab)
            grad = torch.empty(n, vocab, dtype=dtype, device=h.device) if need_grad else None
            lse = torch.empty(n, dtype=torch.float32, device=h.device)
            picked = torch.empty_like(lse)
            for start in range(0, n, rows):
                end = min(n, start + rows)
                index = torch.arange(end - start, device=h.device)
                tgt = target[start:end]
                logits = torch.mm(h[start:end], w.t()).float()
                if bias is not None:
                    logits += bias.float()
                picked[start:end] = logits[index, tgt]
                top = logits.amax(dim=1, keepdim=True)
                exp = logits.sub_(top).exp_()  # in place: the logits are not needed again
                total = exp.sum(dim=1, keepdim=True)
                lse[start:end] = (top + total.log()).squeeze(1)
                if grad is not None:
                    exp.mul_(total.reciprocal_()).sub_(smoothing / spread)
                    if masked is not None:
                        exp[:, masked] += smoothing / spread
                    exp[index, tgt] -= 1.0 - smoothing  # in float32: p_t - (1 - s) can be small
                    grad[start:end] = exp
            kept = weight if masked is None else weight[_kept_rows(vocab, masked)]
            mean_logit = h.float() @ kept.float().mean(dim=0)
            if bias is not None:
                mean_logit += (bias if masked is None else bias[_kept_rows(vocab, masked)]).float().mean()
            nll = (lse - picked).sum()
            uniform = (lse - mean_logit).sum()
        ctx.save_for_backward(grad, h, w)
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(nll)
        return (1.0 - smoothing) * nll + smoothing * uniform, nll

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll: Tensor) -> tuple[Tensor | None, ...]:
        grad, h, w = ctx.saved_tensors
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad_hidden = torch.mm(grad, w).float().mul_(grad_loss).to(hidden_dtype)
        grad_weight = torch.mm(grad.t(), h).float().mul_(grad_loss).to(weight_dtype)
        grad_bias = None if bias_dtype is None else grad.float().sum(dim=0).mul_(grad_loss).to(bias_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, grad_bias


def _kept_rows(vocab: int, masked: Tensor) -> Tensor:
    keep = torch.ones(vocab, dtype=torch.bool, device=masked.device)
    keep[masked] = False
    return keep


class TranslationLoss(nn.Module):
    """The model plus its loss, so one module (what DDP and torch.compile wrap) maps a batch
    to ``(loss_sum, nll_sum)``. Logits are computed only at non-padding target positions.

    ``source_weight`` > 0 (a causal decoder-only model, ``train.source_loss_weight``) adds that
    times the loss of predicting each source token from the ones before it; ``nll_sum`` stays
    the target's, so validation loss and perplexity compare across architectures."""

    def __init__(self, model: Model, smoothing: float, source_weight: float = 0.0):
        """Build it once the model holds its weights: the masked output columns are read then."""
        super().__init__()
        self.model, self.smoothing, self.source_weight = model, smoothing, source_weight
        # Columns the model must never predict keep their bias (training gives them no gradient
        # to speak of): found once here, not at every step.
        bias = model.output_proj.bias
        masked = None if bias is None else (bias.detach() <= MASKED_LOGIT / 2).nonzero().view(-1)
        self.masked = masked if masked is not None and masked.numel() else None

    def forward(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> tuple[Tensor, Tensor]:
        keep = tgt_out != PAD_ID
        if not self.source_weight:
            hidden = self.model.features(src, tgt_in)[keep]
            return self._loss(hidden, tgt_out[keep])
        model = cast(DecoderOnly, self.model)
        sequence = model.sequence_features(src, tgt_in)
        source_len = src.shape[1]
        loss, nll = self._loss(sequence[:, source_len:][keep], tgt_out[keep])
        # Source position i predicts source token i + 1 (the first has nothing before it).
        predicts = src[:, 1:] != PAD_ID
        source_loss, _ = self._loss(sequence[:, : source_len - 1][predicts], src[:, 1:][predicts])
        return loss + self.source_weight * source_loss, nll

    def _loss(self, hidden: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``smoothed_nll`` through the model's output projection and its bias
        (``model.output_bias``), smoothing over the columns not masked."""
        proj = self.model.output_proj
        return smoothed_nll(hidden, proj.weight, target, self.smoothing, self.masked, proj.bias)
