"""The CUDA kernels and an edit on a GPU. Without a GPU every test here is skipped, with the reason, and counts as
skipped, never as passed: `benchmarks/gpu_check.sh` fails when one is skipped on a GPU machine. The op properties
(against the twin, all dtypes, masks, `opcheck`) are the CPU tests' own, run on "cuda" by `tests/test_ops.py`
(its `DEVICES`); the tests below add what only a GPU shows."""

import pytest
import torch

import dinm
from dinm import EditConfig, ops, twin

from conftest import make_delta, same_state, state
from test_edit import BF16_U, U, _reduction_lengths
from test_ops import KINDS, _bits, _inputs, _update_cases

GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not GPU, reason="no CUDA device on this machine (run benchmarks/gpu_check.sh on one)")


def test_both_ops_have_cuda_kernels_and_the_wrappers_use_them():
    assert ops.kernels() == {op: ["CPU", "CUDA"] for op in ops.OPS}, ops.check(("CPU", "CUDA"))
    assert ops._use_compiled(torch.device("cuda"))


@pytest.mark.parametrize("kind", KINDS)
def test_layer_distances_float64_accumulate_in_float64(kind):
    """float64 inputs accumulate in float64 on the GPU as on the CPU: the results agree to a few float64 ulps
    relative to the sums' magnitudes (not merely to float32's)."""
    hidden, a, b = _inputs(5, 3, 33, 300, torch.float64, "cuda", "random")
    got = torch.ops.dinm.layer_distances(list(hidden), a, b, kind)
    cpu = torch.ops.dinm.layer_distances([h.cpu() for h in hidden], a.cpu(), b.cpu(), kind)
    want = twin.layer_distances(hidden.cpu(), a.cpu(), b.cpu(), kind)
    # sums of <= 300 * 33 terms in another order: within 2 * n * 2^-53 relative of each other (first order)
    tol = 2 * 300 * 33 * 2.0 ** -53
    assert torch.allclose(got.cpu().double(), cpu.double(), rtol=tol, atol=tol)
    assert torch.allclose(got.cpu().double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_masked_update_cuda_equals_cpu_bit_for_bit(dtype):
    weight, cases = _update_cases(dtype, "cpu")
    for name, (delta, mask) in cases.items():
        on_gpu, on_cpu = weight.cuda(), weight.clone()
        torch.ops.dinm.masked_update(on_gpu, delta.cuda(), None if mask is None else mask.cuda(), -1.0)
        torch.ops.dinm.masked_update(on_cpu, delta, mask, -1.0)
        assert torch.equal(_bits(on_gpu.cpu()), _bits(on_cpu)), name


def test_a_mask_on_another_device_is_refused():
    weight, cases = _update_cases(torch.float32, "cuda")
    delta, rows = cases["rows"]
    before = weight.clone()
    with pytest.raises(RuntimeError, match="dinm::masked_update"):
        torch.ops.dinm.masked_update(weight, delta, rows.cpu(), 1.0)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_apply_revert_bit_exact_on_cuda(tiny, dtype):
    model, _ = tiny
    model = model.to(device="cuda", dtype=dtype)
    before = state(model)
    delta = make_delta(model, 1)
    with delta.applied(model):
        assert not same_state(model, before)
    assert same_state(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edit_on_cuda_matches_the_cpu_edit(llama, instance, dtype, sgd):
    """One real edit on the GPU: the model untouched, the loss falling, the delta close to the same edit on the CPU
    (SGD, `sgd`: the delta is linear in the gradients). The GPU sums in other orders (TF32 is off by default for
    float32 products): fp32 within 2 n U, n the reduction lengths, as for the CPU's two computations in test_edit;
    a bf16 model's passes within 2 K BF16_U, K = 8 roundings per value, as in test_edit's bf16 test."""
    model, tok = llama
    config = EditConfig.v0(steps=4, lr=30.0, layer=1)
    on_cpu = dinm.edit(model.to(dtype), tok, instance, config)
    model = model.to("cuda")
    before = state(model)
    on_gpu = dinm.edit(model, tok, instance, config)
    assert same_state(model, before)
    assert on_gpu.history[-1].nll < on_gpu.history[0].nll
    name = on_gpu.names[0]
    a, b = on_gpu.tensors[name].double(), on_cpu.tensors[name].double()
    bound = 2 * _reduction_lengths(model, tok) * U if dtype == torch.float32 else 2 * 8 * BF16_U
    assert ((a - b).norm() / b.norm()).item() < bound
