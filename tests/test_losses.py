import pytest
import torch
import torch.nn.functional as F

from dinm.losses import Head, Unedited, kl_to

# Unit roundoffs: fp32 (24 significant bits) and bf16 (8). First order, an fp32 sum of n terms is within n * U of
# its exact value relative to the sum of the terms' absolute values (Higham's gamma_n), whatever the order, and a
# value rounded to bf16 moves by at most BF16_U relative. Two computations of one quantity differ by at most the sum
# of their two bounds: the tolerances below are those sums, computed from the test's own data (in float64).
U, BF16_U = 2.0 ** -24, 2.0 ** -8


def _log_softmax_error(z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """(positions, V) bound on how far two computations of log_softmax(z) differ when their logits differ by up to
    `dz`: dz_v + sum_w q_w dz_w from the logits, and 2 (V + |z_v|) U from two roundings of the V-term sum of exps
    and of z_v - lse."""
    q = z.softmax(-1)
    return dz + (q * dz).sum(-1, keepdim=True) + 2 * (z.shape[-1] + z.abs() + 2) * U


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kl_equals_kl_div_and_its_gradient(dtype):
    torch.manual_seed(0)
    unedited_logits = torch.randn(7, 300) * 3
    unedited_logits[0, :5] = -1e4  # probabilities that underflow to 0 (p log p counts as 0)
    logits = (torch.randn(7, 300) * 3).to(dtype).requires_grad_(True)
    fused = kl_to(logits, Unedited(unedited_logits))
    (grad,) = torch.autograd.grad(fused, [logits])
    x = logits.detach().float().requires_grad_(True)
    plain = F.kl_div(F.log_softmax(x, -1), F.log_softmax(unedited_logits, -1), log_target=True,
                     reduction="batchmean")
    (expected,) = torch.autograd.grad(plain, [x])
    z, lp = x.detach().double(), F.log_softmax(unedited_logits.double(), -1)
    p, q, n, V = lp.exp(), z.softmax(-1), z.shape[0], z.shape[1]
    dlogq = _log_softmax_error(z, torch.zeros_like(z))
    # the value: sum_v p dlog q_v, and the rounding of the two V-term sums (p log p, p log q) in each computation
    value_tol = ((p * dlogq).sum(-1) + 2 * V * U * (p * lp).abs().sum(-1) + 2 * V * U * (p * q.log()).abs().sum(-1))
    assert fused.item() == pytest.approx(plain.item(), abs=value_tol.mean().item())
    assert grad.dtype == dtype
    # the gradient (q - p) / n: q moves by q * dlog q; p and the division round once more in each computation
    grad_tol = (q * dlogq + 4 * U * (p + q)) / n
    got = grad.double()
    if dtype == torch.float32:
        assert ((got - expected.double()).abs() <= grad_tol).all()
    else:  # both rounded to bf16 from fp32 values at most grad_tol apart: one bf16 spacing, <= 2 BF16_U |value|, more
        want = expected.to(dtype).double()
        assert ((got - want).abs() <= grad_tol + 2 * BF16_U * want.abs()).all()


def test_fused_kl_gradcheck():
    torch.manual_seed(0)
    unedited = Unedited(torch.randn(3, 11, dtype=torch.float64))
    unedited.probs, unedited.neg_entropy = unedited.probs.double(), unedited.neg_entropy.double()
    logits = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: kl_to(x, unedited), (logits,))


def test_kl_to_itself_is_zero():
    logits = torch.randn(4, 50)
    log_p = F.log_softmax(logits.double(), -1)
    # sum p log p - sum p log q with p = q: only the two V-term sums' rounding, 2 V U sum |p log p| per position
    tol = (2 * 50 * U * (log_p.exp() * log_p).abs().sum(-1)).mean().item()
    assert abs(kl_to(logits, Unedited(logits)).item()) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_equals_linear_and_loss(dtype):
    """The fused head gives the loss and the gradient for its input of `F.linear` + cross-entropy / KL."""
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 16).to(dtype), torch.randn(300).to(dtype)
    hidden = torch.randn(7, 16, requires_grad=True)
    unedited = Unedited(torch.randn(7, 300) * 3)
    labels = torch.randint(300, (7,))
    head = Head(weight, bias)
    V, d = weight.shape
    n = hidden.shape[0]
    x, w, b = hidden.detach().to(dtype).double(), weight.double(), bias.double()
    z = x @ w.T + b
    # the logits: in each computation a d-term product plus the bias, in fp32; in bf16 the fused head rounds the
    # product and then the bias sum, F.linear the biased product once: 3 roundings of |z| between them
    dz = 2 * (d + 1) * U * (x.abs() @ w.abs().T + b.abs())
    if dtype == torch.bfloat16:
        dz = dz + 3 * BF16_U * z.abs()
    dlogq, q = _log_softmax_error(z, dz), z.softmax(-1)
    for step in range(2):  # the second call reuses the buffers
        for target, plain in ((labels, lambda logits: F.cross_entropy(logits, labels)),
                              (unedited, lambda logits: kl_to(logits, unedited))):
            fused = head.loss(hidden, target)
            (grad,) = torch.autograd.grad(3 * fused, [hidden])
            x = hidden.detach().requires_grad_(True)
            expected = plain(F.linear(x.to(dtype), weight, bias).float())
            (expected_grad,) = torch.autograd.grad(3 * expected, [x])
            if target is labels:
                p = F.one_hot(labels, V).double()
                sums = torch.zeros(n, dtype=torch.float64)
            else:
                p, lp = unedited.probs.double(), unedited.probs.double().clamp_min(1e-300).log()
                sums = 2 * V * U * ((p * lp).abs().sum(-1) + (p * q.log()).abs().sum(-1))  # the KL's two V-term sums
            assert fused.item() == pytest.approx(expected.item(), abs=((p * dlogq).sum(-1) + sums).mean().item())
            # d(3 loss)/d hidden = G W with G = 3 (q - p) / n: G moves by 3 q dlog q / n (+ a rounding in bf16 in
            # each computation), the V-term product adds 2 V U sum |G| |W|, and in bf16 3 roundings of the result
            # (the products, and the fused head's multiplication by 3 in bf16)
            g = 3 * (q - p) / n
            dg = 3 * q * dlogq / n + (2 * BF16_U * g.abs() if dtype == torch.bfloat16 else 0)
            grad_tol = dg @ w.abs() + 2 * V * U * (g.abs() @ w.abs())
            if dtype == torch.bfloat16:
                grad_tol = grad_tol + 3 * BF16_U * (g @ w).abs()
            assert ((grad.double() - expected_grad.double()).abs() <= grad_tol).all()
    assert len(head._buffers) == (2 if dtype == torch.float32 else 3)  # one set of buffers, reused
