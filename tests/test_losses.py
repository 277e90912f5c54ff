import pytest
import torch
import torch.nn.functional as F

from dinm.losses import Head, Reference, kl_to


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kl_equals_kl_div_and_its_gradient(dtype):
    torch.manual_seed(0)
    reference_logits = torch.randn(7, 300) * 3
    reference_logits[0, :5] = -1e4  # probabilities that underflow to 0 (p log p counts as 0)
    logits = (torch.randn(7, 300) * 3).to(dtype).requires_grad_(True)
    fused = kl_to(logits, Reference(reference_logits))
    (grad,) = torch.autograd.grad(fused, [logits])
    x = logits.detach().float().requires_grad_(True)
    plain = F.kl_div(F.log_softmax(x, -1), F.log_softmax(reference_logits, -1), log_target=True,
                     reduction="batchmean")
    (expected,) = torch.autograd.grad(plain, [x])
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    assert grad.dtype == dtype
    assert torch.allclose(grad.float(), expected.to(dtype).float(), atol=1e-6 if dtype == torch.float32 else 1e-3)


def test_fused_kl_gradcheck():
    torch.manual_seed(0)
    reference = Reference(torch.randn(3, 11, dtype=torch.float64))
    reference.probs, reference.neg_entropy = reference.probs.double(), reference.neg_entropy.double()
    logits = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: kl_to(x, reference), (logits,))


def test_kl_to_itself_is_zero():
    logits = torch.randn(4, 50)
    assert kl_to(logits, Reference(logits)).abs().item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_equals_linear_and_loss(dtype):
    """The fused head gives the loss and the gradient for its input of `F.linear` + cross-entropy / KL."""
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 16).to(dtype), torch.randn(300).to(dtype)
    hidden = torch.randn(7, 16, requires_grad=True)
    reference = Reference(torch.randn(7, 300) * 3)
    labels = torch.randint(300, (7,))
    head = Head(weight, bias)
    for step in range(2):  # the second call reuses the buffers
        for target, plain in ((labels, lambda logits: F.cross_entropy(logits, labels)),
                              (reference, lambda logits: kl_to(logits, reference))):
            fused = head.loss(hidden, target)
            (grad,) = torch.autograd.grad(3 * fused, [hidden])
            x = hidden.detach().requires_grad_(True)
            expected = plain(F.linear(x.to(dtype), weight, bias).float())
            (expected_grad,) = torch.autograd.grad(3 * expected, [x])
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            assert fused.item() == pytest.approx(expected.item(), rel=tol)
            assert torch.allclose(grad, expected_grad, rtol=tol, atol=tol * expected_grad.abs().max().item())
    assert len(head._buffers) == (2 if dtype == torch.float32 else 3)  # one set of buffers, reused
