import os

import pytest
import torch

import dinm
from dinm import EditConfig, cache, keys
from dinm.arch import as_out_in, arch_spec, decoder_layers, matrix_name, mlp_module, mlp_out_name
from dinm.text import encode_pair

U = 2.0 ** -24  # fp32 unit roundoff


def _straight_moment(model, tok, layer):
    """E[k k^T] the plain way: every corpus sequence alone, the whole model, every input of the matrix kept."""
    module = model.get_submodule(mlp_out_name(model, layer).rsplit(".", 1)[0])
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for prompt, reply in keys.benign_corpus():
                model(input_ids=torch.tensor([encode_pair(tok, prompt, reply, max_response_tokens=64).ids]))
    finally:
        handle.remove()
    k = torch.cat(seen).double()
    return (k.T @ k / len(k)).float()


def _widths(model) -> tuple[int, int]:
    """The hidden and MLP widths of a tiny model, whatever its config class names them."""
    c = model.config
    width = getattr(c, "hidden_size", None) or c.n_embd
    return width, getattr(c, "intermediate_size", None) or 4 * width


def test_corpus_is_held_apart_from_the_evaluation_list():
    import json
    import os

    from conftest import DATA

    with open(os.path.join(DATA, "benign.json"), encoding="utf-8") as f:
        held_out = {item["prompt"] for item in json.load(f)}
    prompts = {p for p, _ in keys.benign_corpus()}
    assert len(prompts) >= 100 and all(r.strip() for _, r in keys.benign_corpus())
    assert not prompts & held_out


def test_key_moment_equals_the_straightforward_computation(tiny):
    """Batched with right padding, stopped at the edited matrix: the same statistic as one sequence at a time."""
    model, tok = tiny
    keys._CACHE.clear()
    width, inner = _widths(model)
    assert max(len(encode_pair(tok, p, r, max_response_tokens=64).ids) for p, r in keys.benign_corpus()) <= 128
    for layer in (0, 2):
        fast = keys.key_moment(model, tok, layer).double()
        straight = _straight_moment(model, tok, layer).double()
        # Both sum k k^T in float64; they differ by how the fp32 keys were computed (batched GEMMs, padded
        # attention). First order each key is within n U of exact in norm, n the reductions of the layers up to
        # the matrix (width, MLP width, up to 128 positions each): ||dk|| <= 2 n U ||k|| between the two, so
        # ||dM||_F <= 2 (2 n U) E||k||^2 = 4 n U tr(M), plus the final fp32 cast (U ||M||). Measured: 1e-9 tr(M).
        n = (layer + 1) * (width + inner + 128)
        assert (fast - straight).norm() <= 4 * n * U * straight.trace() + U * straight.norm()


def test_key_moment_is_the_models_own_under_a_callers_autocast(llama):
    """An edit with compute_dtype="bfloat16" asks under autocast; the cached statistic must not depend on that."""
    model, tok = llama
    keys._CACHE.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = keys.key_moment(model, tok, 1)
    keys._CACHE.clear()
    assert torch.equal(under, keys.key_moment(model, tok, 1))


def test_key_moment_is_kept_until_the_weights_below_change(llama):
    model, tok = llama
    keys._CACHE.clear()
    calls, handle = _counting_forwards(model)
    try:
        first = keys.key_moment(model, tok, 1)
        runs = len(calls)
        assert keys.key_moment(model, tok, 1) is first and len(calls) == runs  # kept
        with torch.no_grad():
            model.get_parameter(mlp_out_name(model, 1)).mul_(1.5)  # the matrix itself: its inputs stay
        assert keys.key_moment(model, tok, 1) is first and len(calls) == runs
        with torch.no_grad():
            model.get_parameter(mlp_out_name(model, 0)).mul_(1.5)  # below the edited matrix: its inputs change
        again = keys.key_moment(model, tok, 1)
        assert len(calls) > runs and not torch.equal(again, first)
    finally:
        handle.remove()


def test_key_statistic_is_computed_again_after_a_change_of_any_embedding(tiny):
    """Position embeddings (GPT-2's `wpe`) change the edited matrix's inputs as the token embeddings do: the key
    statistic kept in memory (and its disk cache's name) must follow both; the final norm and head do not."""
    model, tok = tiny
    keys._CACHE.clear()
    before = keys._weight_sums(model, 1)
    first = keys.key_moment(model, tok, 1)
    embeddings = [n for n, _ in model.named_parameters() if not n.startswith(("model.layers.", "transformer.h."))
                  and "norm" not in n and "ln_f" not in n and "lm_head" not in n]
    assert embeddings and len(embeddings) == (2 if "wpe" in str(model) else 1)
    for name in embeddings:
        with torch.no_grad():
            model.get_parameter(name).mul_(1.5)
        assert keys._weight_sums(model, 1) != before
        again = keys.key_moment(model, tok, 1)
        assert not torch.equal(again, first)
        with torch.no_grad():
            model.get_parameter(name).div_(1.5)
        before, first = keys._weight_sums(model, 1), keys.key_moment(model, tok, 1)
    (final,) = [n for n, _ in model.named_parameters() if n.startswith(("model.norm.weight", "transformer.ln_f.weight"))]
    with torch.no_grad():
        model.get_parameter(final).mul_(1.5)
    assert keys._weight_sums(model, 1) == before and keys.key_moment(model, tok, 1) is first


def test_preserve_weight_keeps_the_update_off_benign_inputs(tiny, instance):
    """The penalty is what it says: the edited layer's output on the corpus moves less than without it (the
    share recorded in the history is that measure), and it is still an edit."""
    model, tok = tiny
    config = EditConfig.v0(steps=6, lr=3e-3, layer=1)
    moment = keys.key_moment(model, tok, 1)
    weight = as_out_in(arch_spec(model), model.get_parameter(mlp_out_name(model, 1)).detach()).float()
    base = (weight @ moment * weight).sum()
    moved = {}
    for w in (0.0, 10.0):
        delta = dinm.edit(model, tok, instance, config.replace(preserve_weight=w))
        update = as_out_in(arch_spec(model), delta.dense(delta.names[0])).float()
        moved[w] = ((update @ moment * update).sum() / base).item()
        assert update.abs().sum() > 0
    assert moved[10.0] < 0.2 * moved[0.0]  # behaviour, not rounding: the penalty must have a clear effect
    history = delta.history  # the penalised edit's: each step's share is of the update before that step
    assert history[0].moved == 0 and history[-1].moved > 0
    # fp32 loss = (nll + 1.0 * kl) + 10 * moved: 3 roundings of non-negative terms (kl ~ 0 may read -1e-7): <= 3 U
    assert history[-1].loss == pytest.approx(history[-1].nll + history[-1].kl + 10.0 * history[-1].moved,
                                                rel=4 * U)


class _Counted:
    """Counts the embedding's forward calls by wrapping its `forward` (a forward hook would mark the model
    `keys.hooked`, which nothing is cached for); `remove()` unwraps it."""

    def __init__(self, module, calls):
        self.module, inner = module, module.forward
        module.forward = lambda *a, **k: (calls.append(1), inner(*a, **k))[1]

    def remove(self):
        del self.module.forward


def _counting_forwards(model):
    calls = []
    return calls, _Counted(model.get_input_embeddings(), calls)


def test_key_moment_is_kept_on_disk_for_the_next_process(llama, tmp_path, monkeypatch):
    model, tok = llama
    monkeypatch.setenv("DINM_CACHE", str(tmp_path / "cache"))
    keys._CACHE.clear()
    calls, handle = _counting_forwards(model)
    try:
        first = keys.key_moment(model, tok, 1)
        runs = len(calls)
        files = list((tmp_path / "cache").glob("keys-*.safetensors"))
        assert runs > 0 and len(files) == 1
        from safetensors import safe_open

        with safe_open(str(files[0]), "pt") as f:  # the format every earlier version wrote: their files still read
            assert list(f.keys()) == ["moment"]
        keys._CACHE.clear()  # as in a new process
        assert torch.equal(keys.key_moment(model, tok, 1), first) and len(calls) == runs  # read, not computed
        keys._CACHE.clear()
        keys.key_moment(model, tok, 1, chat_template=False)  # other token ids: another file
        assert len(calls) > runs and len(list((tmp_path / "cache").glob("keys-*.safetensors"))) == 2
        runs = len(calls)
        with torch.no_grad():
            model.get_parameter(mlp_out_name(model, 0)).mul_(1.5)  # weights below changed: a miss, not a stale read
        keys._CACHE.clear()
        assert not torch.equal(keys.key_moment(model, tok, 1), first) and len(calls) > runs
    finally:
        handle.remove()


def test_an_unreadable_cache_file_is_computed_again(llama, tmp_path, monkeypatch, caplog):
    model, tok = llama
    monkeypatch.setenv("DINM_CACHE", str(tmp_path))
    keys._CACHE.clear()
    first = keys.key_moment(model, tok, 1)
    (path,) = tmp_path.glob("keys-*.safetensors")
    path.write_bytes(b"not a safetensors file")
    keys._CACHE.clear()
    calls, handle = _counting_forwards(model)
    try:
        assert torch.equal(keys.key_moment(model, tok, 1), first) and calls
    finally:
        handle.remove()
    assert "unreadable key statistic" in caplog.text
    keys._CACHE.clear()
    assert torch.equal(keys.key_moment(model, tok, 1), first)  # the file was written again, whole
    assert not list(tmp_path.glob("*.part"))


def test_an_unwritable_cache_costs_only_the_next_computation(llama, tmp_path, monkeypatch, caplog):
    model, tok = llama
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DINM_CACHE", str(blocker / "cache"))  # under a file: cannot be made
    keys._CACHE.clear()
    moment = keys.key_moment(model, tok, 1)
    assert moment.shape[0] == moment.shape[1] and "could not keep the key statistic" in caplog.text


def test_a_full_disk_costs_only_the_next_computation(llama, tmp_path, monkeypatch, caplog):
    """safetensors reports a full disk as its own error, not an OSError (measured on a full tmpfs: "Error while
    serializing: I/O error: No space left on device (os error 28)"); the statistic is returned all the same."""
    from safetensors import SafetensorError

    def full(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    model, tok = llama
    monkeypatch.setenv("DINM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "save_file", full)
    keys._CACHE.clear()
    moment = keys.key_moment(model, tok, 1)
    assert moment.shape[0] == moment.shape[1] and "No space left on device" in caplog.text
    assert [n for n in os.listdir(tmp_path / "cache")] == []  # no partial file left


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DINM_CACHE", "off")
    assert cache.cache_dir() is None
    monkeypatch.setenv("DINM_CACHE", str(tmp_path))
    assert cache.cache_dir() == str(tmp_path)
    monkeypatch.delenv("DINM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == str(tmp_path / "xdg" / "dinm")


def test_key_penalty_gradient_is_the_plain_one():
    """The penalty's own backward (2 M C, reusing the forward's product) equals autograd's through the plain
    sum((M C) * M), for a symmetric C (a second moment): float64, so the bound is roundoff of n-term sums."""
    from dinm.terms import _Energy

    torch.manual_seed(0)
    keys = torch.randn(50, 12, dtype=torch.float64)
    moment = keys.T @ keys / 50
    moment = (moment + moment.T) / 2
    m = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    value = _Energy.apply(m, moment)
    (grad,) = torch.autograd.grad(value, [m])
    plain = ((m @ moment) * m).sum()
    (expected,) = torch.autograd.grad(plain, [m])
    assert value.item() == pytest.approx(plain.item(), rel=1e-12)
    assert torch.allclose(grad, expected, rtol=1e-12, atol=1e-14)


def _straight_mlp_inputs(model, tok, layer, count):
    """The inputs of `layer`'s MLP block at every token of the first `count` corpus sequences in the order
    `mlp_inputs` draws from (shortest first, as its batches run), the plain way: each sequence alone."""
    from dinm.arch import mlp_module

    seen = []
    handle = mlp_module(model, layer).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    seqs = sorted((encode_pair(tok, p, r, max_response_tokens=64).ids for p, r in keys.benign_corpus()), key=len)
    try:
        seqs = seqs[:count]
        with torch.no_grad():
            for ids in seqs:
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return torch.cat(seen)


def test_mlp_inputs_are_the_mlp_blocks_inputs_at_a_fixed_draw(tiny):
    model, tok = tiny
    keys._CACHE.clear()
    width, inner = _widths(model)
    straight = _straight_mlp_inputs(model, tok, 1, 24).double()  # (the 24 shortest: a whole pass takes 15 s)
    every = keys.mlp_inputs(model, tok, 1, sample=10 ** 9)  # more than the corpus has: every token, in order
    total = sum(len(encode_pair(tok, p, r, max_response_tokens=64).ids) for p, r in keys.benign_corpus())
    assert every.dtype == torch.float32 and every.shape == (total, straight.shape[1])
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:50].sort().values
    # Batched with right padding against one sequence at a time: each input is within 2 n U of the other (in norm),
    # n the reductions up to the block (the layers below it and this layer's attention, up to 128 positions).
    n = 2 * (width + inner + 128)
    first = every[:len(straight)].double()
    assert ((first - straight).norm(dim=1) <= 4 * n * U * straight.norm(dim=1) + 1e-30).all()
    drawn = keys.mlp_inputs(model, tok, 1, sample=50)  # (computed again: kept per sample size)
    assert torch.equal(drawn, every[chosen])  # the same rows of the same batched computation
    assert keys.mlp_inputs(model, tok, 1, sample=50) is drawn
    assert keys.mlp_inputs(model, tok, 1, sample=10 ** 9) is every


def test_mlp_inputs_are_kept_through_a_change_of_the_block_and_on_disk(llama, tmp_path, monkeypatch):
    """The MLP's own weights do not change its inputs: a delta of its gate keeps the sample; one below does not.
    A new process reads it from the disk cache."""
    model, tok = llama
    monkeypatch.setenv("DINM_CACHE", str(tmp_path))
    keys._CACHE.clear()
    calls, handle = _counting_forwards(model)
    try:
        first = keys.mlp_inputs(model, tok, 1, sample=64)
        runs = len(calls)
        with torch.no_grad():
            for matrix in ("gate", "up", "down"):
                model.get_parameter(matrix_name(model, 1, matrix)).mul_(1.5)
        assert keys.mlp_inputs(model, tok, 1, sample=64) is first and len(calls) == runs
        keys._CACHE.clear()  # as in a new process
        assert torch.equal(keys.mlp_inputs(model, tok, 1, sample=64), first) and len(calls) == runs  # read
        with torch.no_grad():
            model.get_parameter(matrix_name(model, 0, "up")).mul_(1.5)  # below: the inputs change
        again = keys.mlp_inputs(model, tok, 1, sample=64)
        assert len(calls) > runs and not torch.equal(again, first)
    finally:
        handle.remove()
    assert torch.equal(keys.key_moment(model, tok, 1), keys.key_moment(model, tok, 1))  # (another kind, another key)


def test_nothing_is_kept_for_a_model_with_forward_hooks(llama, tmp_path, monkeypatch):
    """A hook that changes what a layer computes (a patch's earlier unit, added while the next trains) changes
    the inputs above it: with it, the sample and the key statistic are computed from the hooked model and kept
    neither in memory nor on disk, and the plain model's, kept before, are not read for it (nor it for them)."""
    model, tok = llama
    monkeypatch.setenv("DINM_CACHE", str(tmp_path))
    keys._CACHE.clear()
    plain = keys.mlp_inputs(model, tok, 1, sample=64)
    moment = keys.key_moment(model, tok, 1)
    files = sorted(os.listdir(tmp_path))
    handle = mlp_module(model, 0).register_forward_hook(lambda _m, _args, out: out + 0.5)
    try:
        hooked = keys.mlp_inputs(model, tok, 1, sample=64)
        assert not torch.equal(hooked, plain) and keys.mlp_inputs(model, tok, 1, sample=64) is not hooked
        assert not torch.equal(keys.key_moment(model, tok, 1), moment)
    finally:
        handle.remove()
    assert sorted(os.listdir(tmp_path)) == files  # nothing written under the hook
    assert keys.mlp_inputs(model, tok, 1, sample=64) is plain and keys.key_moment(model, tok, 1) is moment


def test_hooks_that_run_after_the_inputs_are_read_keep_the_cache_and_global_hooks_do_not(llama, tmp_path, monkeypatch):
    """What a hook cannot change is still kept: a forward hook on the read layer's MLP itself (a patch's unit there:
    it runs after the MLP's inputs, and the output matrix's, are read) or on a later layer leaves the kept sample and
    key statistic in use; a pre-hook there, a global forward hook (which runs on every module), a hook on the layer's
    attention, or on a later layer's module that an earlier layer shares, does not; one on the gate only for the
    output matrix's inputs."""
    from torch.nn.modules.module import register_module_forward_hook

    model, tok = llama
    monkeypatch.setenv("DINM_CACHE", str(tmp_path))
    keys._CACHE.clear()
    plain, moment = keys.mlp_inputs(model, tok, 1, sample=64), keys.key_moment(model, tok, 1)
    for module in (mlp_module(model, 1), mlp_module(model, 2)):
        handle = module.register_forward_hook(lambda _m, _args, out: out + 0.5)
        try:
            assert keys.mlp_inputs(model, tok, 1, sample=64) is plain and keys.key_moment(model, tok, 1) is moment
        finally:
            handle.remove()
    layer = decoder_layers(model)[1]
    for register in (lambda: mlp_module(model, 1).register_forward_pre_hook(lambda _m, args: None),
                     lambda: register_module_forward_hook(lambda _m, _args, out: None),
                     lambda: layer.self_attn.register_forward_hook(lambda _m, _args, out: None)):  # (before the MLP)
        handle = register()
        try:
            assert keys.mlp_inputs(model, tok, 1, sample=64) is not plain
            assert keys.key_moment(model, tok, 1) is not moment
        finally:
            handle.remove()
    # Inside the MLP, a hook on the gate runs after the MLP's inputs are read, before the output matrix's.
    handle = mlp_module(model, 1).gate_proj.register_forward_hook(lambda _m, _args, out: out)
    try:
        assert keys.mlp_inputs(model, tok, 1, sample=64) is plain and keys.key_moment(model, tok, 1) is not moment
    finally:
        handle.remove()
    # A module a later layer shares with an earlier one runs before the read layer too: its hook counts.
    layers = decoder_layers(model)
    shared, layers[2] = layers[2], layers[0]
    handle = layers[0].self_attn.register_forward_hook(lambda _m, _args, out: out)
    try:
        assert keys.hooked(model, mlp_module(model, 1))
    finally:
        handle.remove()
        layers[2] = shared


def test_output_penalty_of_the_output_matrix_is_the_key_penalty(tiny):
    """The input-side penalty runs the MLP on benign inputs with the update added; for an update of the output
    matrix that is D k for the block's keys k, so over the same tokens it is `KeyPenalty`'s value."""
    from dinm.arch import mlp_module, mlp_out_module
    from dinm.terms import KeyPenalty, OutputPenalty

    model, tok = tiny
    keys._CACHE.clear()
    spec = arch_spec(model)
    weight = as_out_in(spec, model.get_parameter(mlp_out_name(model, 1)).detach()).float()
    torch.manual_seed(0)
    update = 0.1 * torch.randn_like(weight)
    mlp = mlp_module(model, 1)
    inputs = keys.mlp_inputs(model, tok, 1, sample=10 ** 9)
    output = OutputPenalty(1.0, inputs, mlp, mlp_out_module(model, 1), dict(mlp.named_parameters()))
    key = KeyPenalty(1.0, keys.key_moment(model, tok, 1), weight)
    value, expected = next(output.pieces(update)).item(), next(key.pieces(update)).item()
    # The key penalty sums k k^T in float64; the output penalty sums N fp32 squares per mean (N the corpus's
    # tokens: first order N U relative) and computes k from the sampled inputs by the block's own products
    # (width + inner reductions) rather than inside the batched forward: within 2 (N + width + inner) U.
    width, inner = _widths(model)
    n = len(inputs) + width + inner
    assert value == pytest.approx(expected, rel=4 * n * U)
    assert value > 0


def test_preserve_weight_keeps_an_input_matrix_edit_off_the_benign_mlp_outputs(tiny, instance):
    """For an edit of the MLP's input side the penalty is the relative change of the block's output on the corpus
    sample: a penalised edit changes it far less than an unpenalised one, and is still an edit."""
    from dinm.arch import matrix_module, mlp_module
    from dinm.terms import OutputPenalty

    model, tok = tiny
    keys._CACHE.clear()
    mlp = mlp_module(model, 1)
    inputs = keys.mlp_inputs(model, tok, 1)
    measure = OutputPenalty(1.0, inputs, mlp, matrix_module(model, 1, "up"), dict(mlp.named_parameters()))
    config = EditConfig.v0(steps=6, lr=3e-3, layer=1, matrix="up")
    moved = {}
    for w in (0.0, 10.0):
        delta = dinm.edit(model, tok, instance, config.replace(preserve_weight=w))
        assert delta.names == [matrix_name(model, 1, "up")]
        update = as_out_in(arch_spec(model), delta.dense(delta.names[0])).float()
        moved[w] = next(measure.pieces(update)).item()
        assert update.abs().sum() > 0
    assert moved[10.0] < 0.2 * moved[0.0]  # behaviour, not rounding: the penalty must have a clear effect
    assert delta.history[0].moved == 0 and delta.history[-1].moved > 0
