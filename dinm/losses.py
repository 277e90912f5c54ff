"""The edit's loss terms, fused with the LM head, and the KL against a distribution fixed before the first step.

`F.kl_div(F.log_softmax(logits), log_p, log_target=True)` makes about ten passes over a (positions, vocabulary)
tensor per forward and backward (log-softmax, exp of the target, sub, mul, sum, and their backwards); over a 49k
vocabulary those passes cost more than the LM head's matrix product on a CPU. Here p and its negative entropy are
computed once (`Unedited`), and a step costs one log-softmax and one dot product forward and one exp and sub
backward (the gradient of KL(p || q) with respect to the logits is q - p), with no exp into subnormal numbers
(`LOG_FLOOR`). `Head` goes further: the head's matrix product, the loss and the gradient for the head's input in
buffers kept across steps (`kl_to` is the same KL on logits the model computed, for heads `Head` cannot stand in for).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function


# e^-87 ~ 1.6e-38, about the smallest normal float32. Probabilities below it are raised to it: a change smaller than
# fp32 resolves next to any other term of the sums they enter, which keeps `exp` out of subnormal results, 10-50x
# slower on x86 CPUs (a 49k-vocabulary softmax of a real model has thousands of entries there per position).
LOG_FLOOR = -87.0


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) dot products of the rows of two (n, V) tensors, as (n, 1, V) @ (n, V, 1): no (n, V) product tensor."""
    return torch.bmm(a[:, None, :], b[:, :, None]).reshape(-1)


def _kl_sum(log_q: torch.Tensor, unedited: "Unedited") -> torch.Tensor:
    """Sum over positions of KL(p || q) = sum_v p log p - p log q."""
    return (unedited.neg_entropy - _row_dots(unedited.probs, log_q)).sum()


class Unedited:
    """A fixed distribution per position, from the unedited model's logits: (positions, vocab) probabilities
    and the (positions,) sums of p log p."""

    def __init__(self, logits: torch.Tensor):
        log_p = F.log_softmax(logits.float(), dim=-1).clamp_min_(LOG_FLOOR)
        self.probs = log_p.exp()
        self.neg_entropy = _row_dots(self.probs, log_p)  # sum p log p


class _KL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, unedited):
        log_q = F.log_softmax(logits, dim=-1)
        ctx.save_for_backward(log_q, unedited.probs)
        return _kl_sum(log_q, unedited) / logits.shape[0]

    @staticmethod
    def backward(ctx, grad):
        log_q, probs = ctx.saved_tensors
        return log_q.clamp_min(LOG_FLOOR).exp_().sub_(probs).mul_(grad / log_q.shape[0]), None


def kl_to(logits: torch.Tensor, unedited: Unedited) -> torch.Tensor:
    """Mean over positions of KL(unedited || softmax(logits)) — `F.kl_div(F.log_softmax(logits), log p,
    log_target=True, reduction="batchmean")` — with a gradient for `logits` (computed in fp32, the dtype of
    `unedited`)."""
    return _KL.apply(logits.to(unedited.probs.dtype), unedited)


class Head:
    """The LM head applied by dinm, fused with the loss: logits, log-softmax and the gradient with respect to the
    head's input all in buffers kept across steps, so that a step allocates no (positions, vocabulary) tensor.

    On a CPU every fresh tensor of that size costs thousands of page faults (30 MB for 153 positions of a 49k
    vocabulary; about 40 ms on a 2-core VM, more than its matrix product), and a plain `lm_head` + loss makes
    half a dozen of them per sequence and step (logits, log-softmax, the product with p, and in the backward
    their gradients and the zero-filled gradient of the slice). Here the gradient with respect to the head's input,
    (positions, hidden), is computed in the forward and kept for the backward: the head's weight is frozen.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        self._buffers: dict = {}

    def _buffer(self, name: str, rows: int, dtype: torch.dtype) -> torch.Tensor:
        key = (name, rows, dtype)
        if key not in self._buffers:
            self._buffers[key] = self.weight.new_empty((rows, self.weight.shape[0]), dtype=dtype)
        return self._buffers[key]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(positions, vocab) fp32 logits of (positions, hidden) states, as the model's head gives them."""
        return F.linear(hidden.to(self.weight), self.weight, self.bias).float()

    def loss(self, hidden: torch.Tensor, target) -> torch.Tensor:
        """Mean over positions of the NLL of `target` (a (positions,) tensor of token ids) or of
        KL(target || softmax(logits)) (`target` an `Unedited`), with a gradient for `hidden`. The KL's value is
        sum p log p - sum p log q, each near the entropy: it carries an absolute rounding error of about 1e-6
        (a KL of 1e-7 may read as a small negative number); its gradient, q - p, has no such cancellation."""
        return _HeadLoss.apply(hidden, self, target)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, head: Head, target):
        # (the whole head runs here: its backward only scales the input gradient computed now)
        with torch.autocast(hidden.device.type, enabled=False), record_function("dinm::head"):
            return _HeadLoss._forward(ctx, hidden, head, target)

    @staticmethod
    def _forward(ctx, hidden, head: Head, target):
        n, weight = hidden.shape[0], head.weight
        logits = head._buffer("logits", n, weight.dtype)
        torch.mm(hidden.detach().to(weight), weight.t(), out=logits)
        if head.bias is not None:
            logits.add_(head.bias)
        if logits.dtype != torch.float32:  # (log_softmax's own upcast would allocate a new tensor each time)
            logits = head._buffer("logits_fp32", n, torch.float32).copy_(logits)
        log_q = torch.log_softmax(logits, -1, out=head._buffer("log_q", n, torch.float32))
        if isinstance(target, Unedited):
            loss = _kl_sum(log_q, target)
        else:
            loss = -log_q.gather(1, target[:, None]).sum()
        # d loss / d logits = softmax - p (p one-hot for the NLL), over n; then through the head to its input
        grad = log_q.clamp_min_(LOG_FLOOR).exp_()
        if isinstance(target, Unedited):
            grad.sub_(target.probs)
        else:
            grad[torch.arange(n, device=grad.device), target] -= 1
        grad.div_(n)
        if weight.dtype != torch.float32:
            grad = head._buffer("logits", n, weight.dtype).copy_(grad)
        ctx.save_for_backward(torch.mm(grad, weight))
        ctx.dtype, ctx.device = hidden.dtype, hidden.device  # (the head may sit on another device than the layers)
        return loss / n

    @staticmethod
    def backward(ctx, grad):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad).to(device=ctx.device, dtype=ctx.dtype), None, None
