"""The compiled ops (csrc/) against their PyTorch twin (dinm/twin.py)."""

import os

import pytest
import torch

from dinm import ops, twin

COMPILED = ops.backend().startswith("compiled")
needs_ext = pytest.mark.skipif(not COMPILED, reason=f"C++ extension not built: {ops.backend()}")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KINDS = ("cosine", "l2", "l2_tokens")
U = 2.0 ** -24  # fp32 unit roundoff


def test_the_compiled_backend_runs_where_required():
    """`make test` (CI) sets DINM_REQUIRE_EXT=1: there the extension must have been built and be in use."""
    if os.environ.get("DINM_REQUIRE_EXT") != "1":
        pytest.skip("DINM_REQUIRE_EXT is not set")
    assert ops.backend().startswith("compiled (CPU"), ops.backend()


def _inputs(layers, pairs, tokens, width, dtype, device, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(layers, 2 * pairs, tokens, width, generator=g) * 3
    hidden[:, :, 0] *= 50  # an attention-sink-like first position
    if pattern == "right":  # right padding of random length
        lengths = torch.randint(1, tokens + 1, (2, pairs), generator=g)
        pos = torch.arange(tokens)
        mask_a, mask_b = (pos[None] < lengths[0, :, None]), (pos[None] < lengths[1, :, None])
    elif pattern == "random":
        mask_a, mask_b = (torch.rand(2, pairs, tokens, generator=g) > 0.4).unbind(0)
    elif pattern == "empty":  # a pair with no common position
        mask_a = torch.zeros(pairs, tokens, dtype=torch.bool)
        mask_b = torch.ones(pairs, tokens, dtype=torch.bool)
    else:
        mask_a = mask_b = torch.ones(pairs, tokens, dtype=torch.bool)
    return hidden.to(dtype).to(device), mask_a.to(device), mask_b.to(device)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 2, 7, 5), (30, 1, 40, 64), (4, 3, 17, 257)])
@pytest.mark.parametrize("pattern", ["right", "random", "all", "empty"])
def test_layer_distances_match_the_twin_fp32(device, kind, shape, pattern):
    hidden, a, b = _inputs(*shape, torch.float32, device, pattern)
    got = torch.ops.dinm.layer_distances(list(hidden), a, b, kind)
    want = twin.layer_distances(hidden, a, b, kind)
    assert got.dtype == torch.float32 and got.shape == want.shape == (shape[0], shape[1])
    assert ((got.double() - want.double()).abs().cpu() <= _fp32_bound(hidden, a, b, kind)).all()


def _fp32_bound(hidden, mask_a, mask_b, kind):
    """(layers, pairs) bound on how far two fp32 computations of `kind` may differ, whatever their summation
    order: first order, an fp32 sum of n terms is within n U of exact relative to the sum of the terms' absolute
    values (Higham's gamma_n); each side gets that bound, computed here in float64 from the inputs."""
    h = hidden.double().cpu()
    a, b = mask_a.cpu(), mask_b.cpu()
    x, y = h[:, 0::2], h[:, 1::2]
    tokens, width = h.shape[2], h.shape[3]
    if kind == "l2_tokens":  # a sum of tokens * width squares, all >= 0: relative (tokens * width) U, halved by sqrt
        both = (a & b).double()[None, :, :, None]
        exact = (((x - y) ** 2) * both).sum((2, 3)).sqrt()
        return 2 * (tokens * width / 2 + 2) * U * exact
    ma, mb = a.double()[None, :, :, None], b.double()[None, :, :, None]
    ca, cb = ma.sum(2).clamp_min(1), mb.sum(2).clamp_min(1)
    mean_x, mean_y = (x * ma).sum(2) / ca, (y * mb).sum(2) / cb
    # each masked mean is within (tokens + 1) U of exact relative to the mean of |h| (the first position's 50x
    # included), element by element: these are the norms of those errors
    err_x = (tokens + 1) * U * ((x.abs() * ma).sum(2) / ca).norm(dim=-1)
    err_y = (tokens + 1) * U * ((y.abs() * mb).sum(2) / cb).norm(dim=-1)
    if kind == "l2":  # then a difference and a width-term sum of squares (relative (width / 2 + 2) U after sqrt)
        exact = (mean_x - mean_y).norm(dim=-1)
        return 2 * (err_x + err_y + (width / 2 + 2) * U * exact)
    # cosine: a mean m moved by e turns its direction by at most 2 |e| / |m|; the dot product and the norms over
    # width add (width + 3) U (|<x, y>| <= |x| |y|), and 1 - cos one more rounding
    nx, ny = mean_x.norm(dim=-1), mean_y.norm(dim=-1)
    turn = torch.where(nx > 0, err_x / nx.clamp_min(1e-300), 0) + torch.where(ny > 0, err_y / ny.clamp_min(1e-300), 0)
    return 2 * (2 * turn + (width + 5) * U)


def _naive_same_dtype(hidden, a, b, kind):
    """What straightforward PyTorch code computes when it stays in the input's dtype."""
    x, y = hidden[:, 0::2], hidden[:, 1::2]
    if kind == "l2_tokens":
        both = (a & b)[None, :, :, None].to(hidden.dtype)
        return (((x - y) * both) ** 2).sum(dim=(2, 3)).sqrt().float()
    ma, mb = a[None, :, :, None].to(hidden.dtype), b[None, :, :, None].to(hidden.dtype)
    mean_x = (x * ma).sum(2) / ma.sum(2).clamp_min(1)
    mean_y = (y * mb).sum(2) / mb.sum(2).clamp_min(1)
    if kind == "l2":
        return (mean_x - mean_y).norm(dim=-1).float()
    return (1 - torch.nn.functional.cosine_similarity(mean_x, mean_y, dim=-1)).float()


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_distances_low_precision_accumulate_in_fp32(device, dtype, kind):
    hidden, a, b = _inputs(6, 2, 48, 96, dtype, device, "right", seed=1)
    exact = twin.layer_distances(hidden.double(), a, b, kind)
    error = (torch.ops.dinm.layer_distances(list(hidden), a, b, kind).double() - exact).abs().cpu()
    # the inputs are exact in fp32 and the twin computes in fp32 (`.float()`): accumulating in fp32, the op is within
    # the fp32 bound of it; in the input's dtype it would not be (a bf16 sum of 48 tokens is off by ~48 * 2^-8)
    fp32 = _fp32_bound(hidden, a, b, kind)
    assert (error <= fp32).all()
    ours, theirs = error.max(), (_naive_same_dtype(hidden, a, b, kind).double() - exact).abs().max()
    assert ours <= 2 * theirs + fp32.max(), (float(ours), float(theirs))


@needs_ext
def test_layer_distances_bad_input_is_an_error():
    hidden, a, b = _inputs(2, 1, 4, 3, torch.float32, "cpu", "all")
    with pytest.raises(RuntimeError, match="kind must be"):
        torch.ops.dinm.layer_distances(list(hidden), a, b, "manhattan")
    with pytest.raises(RuntimeError, match="masks must be bool"):
        torch.ops.dinm.layer_distances(list(hidden), a.float(), b, "l2")
    with pytest.raises(RuntimeError, match="hidden must be"):
        torch.ops.dinm.layer_distances([h[:1] for h in hidden], a, b, "l2")
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.dinm.layer_distances([hidden[0], hidden[1][:, :2]], a, b, "l2")


def _bits(t):
    return t.reshape(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _update_cases(dtype, device):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(9, 13, generator=g).to(dtype)
    weight[0, 0] = -0.0  # -0.0 + 0.0 would flip the sign bit: masked elements must not be touched at all
    delta = (torch.randn(9, 13, generator=g) * 1e-2).to(dtype)
    rows = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    elements = torch.rand(9, 13, generator=g) > 0.5
    cases = {"dense": (delta, None), "elements": (delta, elements), "rows": (delta, rows),
             "compact rows": (delta[rows].contiguous(), rows)}
    return weight.to(device), {k: (d.to(device), None if m is None else m.to(device)) for k, (d, m) in cases.items()}


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("alpha", [1.0, -1.0, 0.5])
def test_masked_update_is_bit_identical_to_the_twin(device, dtype, alpha):
    weight, cases = _update_cases(dtype, device)
    for name, (delta, mask) in cases.items():
        ours, theirs = weight.clone(), weight.clone()
        torch.ops.dinm.masked_update(ours, delta, mask, alpha)
        twin.masked_update(theirs, delta, mask, alpha)
        assert torch.equal(_bits(ours), _bits(theirs)), name
        if mask is not None:  # outside the mask every bit is kept
            keep = ~(mask if mask.shape == weight.shape else mask[:, None].expand_as(weight))
            assert torch.equal(_bits(ours[keep]), _bits(weight[keep])), name
        if name == "dense":  # and it is exactly Tensor.add_
            assert torch.equal(_bits(ours), _bits(weight.clone().add_(delta, alpha=alpha)))


@needs_ext
def test_masked_update_bad_input_changes_nothing():
    weight, cases = _update_cases(torch.float32, "cpu")
    before = weight.clone()
    delta, rows = cases["compact rows"]
    for args in [(delta.double(), rows), (delta[:2], rows), (delta, rows[:3]), (cases["dense"][0], rows.float())]:
        with pytest.raises(RuntimeError, match="dinm::masked_update"):
            torch.ops.dinm.masked_update(weight, *args, 1.0)
    assert torch.equal(weight, before)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    hidden, a, b = _inputs(3, 2, 5, 8, torch.float32, device, "right")
    for kind in KINDS:
        torch.library.opcheck(torch.ops.dinm.layer_distances.default, (list(hidden), a, b, kind))
    weight, cases = _update_cases(torch.float32, device)
    for delta, mask in cases.values():
        torch.library.opcheck(torch.ops.dinm.masked_update.default, (weight.clone(), delta, mask, 1.0))


@needs_ext
def test_ops_work_under_torch_compile():
    hidden, a, b = _inputs(3, 2, 5, 8, torch.float32, "cpu", "right")
    def pick(h):  # one graph, no break: the op has a fake (meta) implementation
        return torch.ops.dinm.layer_distances(list(h), a, b, "cosine").argmax(0)

    compiled = torch.compile(pick, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(hidden), twin.layer_distances(hidden, a, b, "cosine").argmax(0))


@pytest.mark.parametrize("compiled", [False, True])
def test_wrappers_run_the_path_they_say(monkeypatch, compiled):
    """With the compiled path off (what CI checks when the build fails) the wrappers run the twin, with it on the
    compiled op; either way the results are the ones computed here by hand."""
    if compiled and not COMPILED:
        pytest.skip(f"C++ extension not built: {ops.backend()}")
    calls = []
    for name in ("layer_distances", "masked_update"):
        monkeypatch.setattr(twin, name, lambda *args, real=getattr(twin, name): calls.append(1) or real(*args))
    monkeypatch.setattr(ops, "_use_compiled", lambda device: compiled)
    hidden, a, b = _inputs(3, 2, 6, 8, torch.float32, "cpu", "random")
    got = ops.layer_distances(hidden, a, b, "l2")
    # by hand, in float64: per layer and pair, the L2 distance between the masked means of the two responses
    h = hidden.double()
    means = [[(h[i, 2 * p][a[p]].mean(0), h[i, 2 * p + 1][b[p]].mean(0)) for p in range(a.shape[0])]
             for i in range(h.shape[0])]
    want = torch.tensor([[(ma - mb).norm().item() for ma, mb in row] for row in means], dtype=torch.float64)
    # fp32 means of <= 6 terms and a norm of 8: each mean element within 6 U of exact relative to the mean of the
    # absolute values (Higham's gamma_n, first order), so the distance within 16 U (||mean |a||| + ||mean |b|||)
    scale = torch.tensor([[(h[i, 2 * p][a[p]].abs().mean(0).norm() + h[i, 2 * p + 1][b[p]].abs().mean(0).norm()).item()
                           for p in range(a.shape[0])] for i in range(h.shape[0])], dtype=torch.float64)
    assert a.any(1).all() and b.any(1).all()  # (no empty mask: the twin's zero mean for one is not what is tested)
    assert ((got.double() - want).abs() <= 16 * U * scale).all()
    assert (want > 0.1).all()  # distances far from 0: the check above is a relative one
    weight, cases = _update_cases(torch.float32, "cpu")
    delta, rows = cases["compact rows"]
    w = weight.clone()
    ops.masked_update(w, delta, rows, 1.0)
    expected = weight.clone()
    expected[rows] = weight[rows] + delta  # one rounding per element, the rows outside the mask untouched
    assert torch.equal(_bits(w), _bits(expected))
    assert len(calls) == (0 if compiled else 2)


@needs_ext
def test_check_is_one_line_and_fails_on_a_missing_kernel():
    """`python -m dinm.ops CPU CUDA` is what `make cuda-build` runs: one line, and an error where a kernel is missing."""
    line = ops.check(("CPU",))
    assert "\n" not in line and "layer_distances CPU" in line and "masked_update CPU" in line
    if "CUDA" not in ops._devices():
        with pytest.raises(RuntimeError, match="no kernel for layer_distances on CUDA, masked_update on CUDA"):
            ops.check(("CPU", "CUDA"))
