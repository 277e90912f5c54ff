import math
import pytest
import torch

import dinm
from dinm import EditConfig
from dinm.arch import mlp_out_name
from dinm.errors import ConfigError, EditError
from dinm.text import encode_pair

from conftest import same_state, state

FAST = EditConfig.v0(steps=4, lr=1e-2)

# fp32 unit roundoff. Two fp32 computations of the same quantity that order their sums differently differ by at
# most about n * U relative, n the length of the reductions along the way (Higham's gamma_n, first order).
U = 2.0 ** -24
# bf16 unit roundoff (8 significant bits): every value a bf16 pass rounds moves by up to BF16_U relative.
BF16_U = 2.0 ** -8


def test_edit_leaves_the_model_bit_identical(tiny, instance):
    model, tok = tiny
    model.train()  # a mode edit must restore, not just eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    list(model.parameters())[0].requires_grad_(False)
    flags[next(iter(flags))] = False
    before = state(model)
    delta = dinm.edit(model, tok, instance, FAST)
    assert same_state(model, before)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert delta.names == [mlp_out_name(model, delta.layer)]


def test_edit_lowers_the_safe_nll_and_only_touches_one_tensor(tiny, instance):
    model, tok = tiny
    delta = dinm.edit(model, tok, instance, FAST)
    h = delta.history
    assert len(h) == 4 and h[-1]["nll"] < h[0]["nll"]
    assert len(delta.names) == 1 and delta.tensors[delta.names[0]].abs().sum() > 0
    assert delta.layer == dinm.locate(model, tok, instance, FAST.distance).layer
    assert delta.distances == dinm.locate(model, tok, instance).distances


def test_layer_override(llama, instance):
    model, tok = llama
    delta = dinm.edit(model, tok, instance, FAST.replace(layer=1))
    assert delta.layer == 1 and delta.names == ["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ConfigError, match="layer 7 is out of range"):
        dinm.edit(model, tok, instance, FAST.replace(layer=7))


def test_kl_term_has_a_gradient(llama, instance):
    """With the KL weighted heavily the benign distribution moves less than without it: the KL
    constrains the edit (in the reference implementation it has no gradient and would not)."""
    model, tok = llama
    config = EditConfig.v0(steps=8, lr=3e-2, layer=2)
    free = dinm.edit(model, tok, instance, config.replace(kl_weight=0.0)).history[-1]["kl"]
    held = dinm.edit(model, tok, instance, config.replace(kl_weight=100.0)).history[-1]["kl"]
    # Not a rounding tolerance: without a gradient the two edits are the same computation (ratio exactly 1);
    # with it the KL ends ~6x lower (measured 0.17); 0.5 asks for a clear effect, far from both.
    assert held < 0.5 * free


def test_nan_aborts_and_leaves_the_model(llama, instance):
    model, tok = llama
    with torch.no_grad():
        model.lm_head.weight[5, 3] = float("nan")  # a broken checkpoint: the loss is NaN
    before = state(model)
    with pytest.raises(EditError, match="diverged at step 0: loss is nan; the model is unchanged"):
        dinm.edit(model, tok, instance, EditConfig.v0(steps=3, layer=0))
    assert same_state(model, before)


def test_edit_is_deterministic(llama, instance):
    model, tok = llama
    a = dinm.edit(model, tok, instance, FAST)
    b = dinm.edit(model, tok, instance, FAST)
    assert torch.equal(a.tensors[a.names[0]], b.tensors[b.names[0]])


def test_master_dtype_model_in_bf16(llama, instance):
    model, tok = llama
    model = model.to(torch.bfloat16)
    delta = dinm.edit(model, tok, instance, FAST.replace(master_dtype="model", layer=0))
    assert delta.tensors[delta.names[0]].dtype == torch.bfloat16
    fp32_master = dinm.edit(model, tok, instance, FAST.replace(layer=0))
    assert fp32_master.tensors[fp32_master.names[0]].dtype == torch.bfloat16


def test_metadata_records_config_and_model(llama, instance):
    model, tok = llama
    delta = dinm.edit(model, tok, instance, FAST)
    assert delta.config == FAST
    assert delta.metadata["model_type"] == "llama"
    assert delta.metadata["instance_id"] == instance.id


def _reduction_lengths(model, tok) -> int:
    """Sum of the lengths of the reductions a tiny model's loss gradient goes through: the vocabulary (softmax,
    the head's product back to the hidden state), and per layer the hidden and MLP widths and up to 200 positions
    (attention) - about 400 + 3 * (32 + 128 + 200) < 1500 here."""
    c = model.config
    width = getattr(c, "hidden_size", None) or c.n_embd
    inner = getattr(c, "intermediate_size", None) or 4 * width
    return len(tok) + c.num_hidden_layers * (width + inner + 200)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("layer", [0, 2])
def test_cached_path_equals_full_forwards(tiny, instance, layer, sgd):
    """Replaying the frozen layers' outputs and keeping only the needed logits gives the same loss
    trajectory and the same delta as running the whole model at every step, up to fp32 roundoff.

    With SGD (`sgd`) the delta is -lr times the sum of the steps' gradients, so its difference between the two
    paths is bounded by their gradients' (relative) rounding difference; Adam would turn a rounding difference in
    a near-zero gradient element into a change of ~lr there. lr 30: these tiny models' gradients are ~0.03-0.3 in
    norm, so SGD needs it to move the loss and weights in 5 steps."""
    model, tok = tiny
    config = EditConfig.v0(steps=5, lr=30.0, layer=layer)
    fast = dinm.edit(model, tok, instance, config)
    slow = dinm.edit(model, tok, instance, config.replace(cache=False))
    # Both paths compute the same sums in other orders (GEMMs of other shapes, the fused head): first order, each
    # result is within n * U (relative) of exact, n < 1500 the reduction lengths; 2 * n * U (both paths' errors)
    # < 2e-4; measured 1e-7 to 3e-7. Broken, measured: logits kept one position off move the NLL by 1e-2, and 0.1%
    # noise in the replayed outputs (or in the fused head's weight) moves the delta by 5e-4 to 1e-3.
    n = _reduction_lengths(model, tok)
    assert n < 1500 and 2 * n * U < 2e-4 and len(encode_pair(tok, instance.prompt, instance.safe).ids) <= 200
    # The KL is read as sum p log p - sum p log q, two V-term sums that cancel, each about log V here (untrained
    # models: near-uniform p and q): its rounding is absolute, at most V U log V ~ 1.4e-4 per path (measured 6e-8).
    kl_tol = 2 * len(tok) * U * math.log(len(tok))
    for a, b in zip(fast.history, slow.history):
        assert a["nll"] == pytest.approx(b["nll"], rel=2e-4)
        assert a["kl"] == pytest.approx(b["kl"], abs=kl_tol)
    assert fast.history[-1]["nll"] < fast.history[0]["nll"] - 1e-2  # the edit did move the loss
    name = fast.names[0]
    base = model.get_parameter(name).detach()
    assert _relative(fast.tensors[name], slow.tensors[name]) < 2e-4
    assert fast.tensors[name].norm() > 0.01 * base.norm()  # and the weights, by more than 1%


def test_cached_path_runs_the_fused_head(tiny, instance, monkeypatch):
    """With caching the loss comes from `dinm.losses.Head` (so the equivalence test above compares it with the
    model's own head); a head whose output is not the logits (Gemma 2's final soft-capping) keeps the model's."""
    from dinm.edit import _fused_head
    from dinm.losses import Head

    model, tok = tiny
    calls = []
    monkeypatch.setattr(Head, "loss", lambda self, *a, original=Head.loss: calls.append(1) or original(self, *a))
    dinm.edit(model, tok, instance, EditConfig.v0(steps=3, layer=1))
    assert len(calls) == 3 + 2  # 3 NLL steps, 2 KL steps (none at the first)
    calls.clear()
    dinm.edit(model, tok, instance, EditConfig.v0(steps=3, layer=1, cache=False))
    assert not calls
    assert _fused_head(model, {}, None) is not None
    model.config.final_logit_softcapping = 30.0
    assert _fused_head(model, {}, None) is None


def test_frozen_layers_below_run_once(llama, instance):
    """Layer 0 (below the edited layer 1) runs once per sequence; layer 2 (above) runs at every step, but not in
    the attack's recording pass (its unedited logits are never read), nor for the benign KL at the first step
    (the model is still unedited there: the KL and its gradient are 0)."""
    model, tok = llama
    calls = {0: [], 2: []}
    handles = [model.model.layers[i].mlp.register_forward_hook(lambda *a, i=i: calls[i].append(1)) for i in calls]
    try:
        delta = dinm.edit(model, tok, instance, EditConfig.v0(steps=4, layer=1))
        cached = {i: len(c) for i, c in calls.items()}
        for c in calls.values():
            c.clear()
        dinm.edit(model, tok, instance, EditConfig.v0(steps=4, layer=1, cache=False))
    finally:
        for h in handles:
            h.remove()
    assert cached[0] == 2  # one recording pass per sequence (attack + safe, benign), none per step
    assert cached[2] == 1 + 4 + 3  # benign recording; 4 attack steps, 3 benign ones
    assert len(calls[0]) == len(calls[2]) == 1 + 4 + 3  # uncached: the whole model in every pass
    assert not model.model.layers[0].__dict__.get("forward")  # the replacement forward is gone
    assert delta.history[0]["kl"] == 0.0 and delta.history[1]["kl"] != 0.0


def test_row_restricted_edit_changes_only_its_rows(tiny, instance):
    model, tok = tiny
    before = state(model)
    delta = dinm.edit(model, tok, instance, EditConfig.v0(steps=4, lr=1e-2, rows=0.25, weight_decay=0.1))
    name = delta.names[0]
    rows = model.get_parameter(name).shape[0]
    summary = delta.summary()["tensors"][name]
    assert summary["form"] == "rows" and summary["rows_changed"] == math.ceil(0.25 * rows)
    assert delta.history[-1]["nll"] < delta.history[0]["nll"]
    assert same_state(model, before)
    delta.apply(model)
    changed = (model.get_parameter(name) != before[name]).any(dim=1)
    assert int(changed.sum()) <= summary["rows_changed"]
    delta.revert(model)
    assert same_state(model, before)


def _keys(model, layer, tok, instance, config):
    """Inputs of the edited matrix on the KL sequences, as edit sees them."""
    from dinm.edit import _inputs_of, _kl_texts

    module = model.get_submodule(mlp_out_name(model, layer).rsplit(".", 1)[0])
    with _inputs_of(module) as keys, torch.no_grad():
        for e in _kl_texts(model, tok, instance, config):
            model(input_ids=torch.tensor([e.ids]))
    return torch.cat(keys)


def test_protect_keeps_the_update_off_the_benign_inputs(llama, instance):
    """With `protect` the update maps the KL sequences' inputs (almost) as before; without it, it does not."""
    model, tok = llama
    config = EditConfig.v0(steps=4, lr=3e-2, layer=1, kl_text="self", kl_reply_tokens=8, kl_prompts=("Hi there",))
    keys = _keys(model, 1, tok, instance, config)
    share = 0.999
    moved, bound = {}, {}
    for protect in (None, share):
        delta = dinm.edit(model, tok, instance, config.replace(protect=protect))
        update = delta.dense(delta.names[0]).float()
        moved[protect] = ((keys @ update.T).norm() / (keys.norm() * update.norm())).item()
        assert update.abs().sum() > 0  # still an edit
        # An update with no component in the input directions that hold `share` of the keys' energy maps them to at
        # most sqrt(1 - share) of ||K|| ||D||: ||K D^T|| <= ||K P|| ||D||, P the projector on the rest. fp32 adds
        # the projection's rounding (2 * in_features * U relative) and that of W + D (U ||W|| / ||D||), x2 margin.
        weight = model.get_parameter(delta.names[0]).detach()
        bound[protect] = (1 - share) ** 0.5 + 2 * (2 * keys.shape[1] + 1 + (weight.norm() / update.norm()).item()) * U
    assert moved[share] <= bound[share]  # measured 0.009 <= 0.032
    assert moved[None] > 2 * bound[share]  # without it they move more than the bound allows (measured 0.14)


def test_max_update_bounds_the_norm(llama, instance):
    model, tok = llama
    config = EditConfig.v0(steps=4, lr=3e-2, layer=1)
    weight = model.get_parameter(mlp_out_name(model, 1)).detach()
    free = dinm.edit(model, tok, instance, config)
    held = dinm.edit(model, tok, instance, config.replace(max_update=0.01))
    norm = lambda d: d.dense(d.names[0]).float().norm().item() / weight.norm().item()  # noqa: E731
    # The update is scaled onto the bound with a norm computed in fp32 (a sum of numel squares: <= numel * U
    # relative), then goes through W + D and back (each a rounding of U |W| per element: U / 0.01 relative to the
    # bound); the norm here is one more sum of numel terms.
    tol = 2 * weight.numel() * U + 2 * U / 0.01
    assert norm(free) > 0.01 and norm(held) <= 0.01 * (1 + tol)


def test_stop_nll_stops_once_the_safe_response_is_likely(llama, instance):
    model, tok = llama
    config = EditConfig.v0(steps=8, lr=3e-2, layer=1)
    full = dinm.edit(model, tok, instance, config).history
    threshold = (full[1]["nll"] + full[2]["nll"]) / 2  # reached after two steps
    early = dinm.edit(model, tok, instance, config.replace(stop_nll=threshold))
    assert early.history[-1].get("stopped") and len(early.history) == 3
    assert dinm.edit(model, tok, instance, config.replace(stop_nll=full[0]["nll"] + 1)).dense(
        mlp_out_name(model, 1)).abs().sum() == 0  # likely already: no change at all


def test_kl_text_self_reads_the_models_own_reply(llama, instance):
    from dinm.edit import _kl_texts

    model, tok = llama
    answer = _kl_texts(model, tok, instance, EditConfig.v0())
    own = _kl_texts(model, tok, instance, EditConfig.v0(kl_text="self", kl_reply_tokens=5, kl_prompts=("Hello",)))
    assert len(answer) == 1 and len(own) == 2
    assert own[0].ids[:own[0].n_prompt] == answer[0].ids[:answer[0].n_prompt]  # same prompt, other reply
    prompt = torch.tensor([own[0].ids[:own[0].n_prompt]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0].tolist()
    assert own[0].ids == generated[:len(own[0].ids)]


@pytest.mark.parametrize("layer", [0, 2])
def test_bf16_compute_tracks_fp32(tiny, instance, layer, sgd):
    """compute_dtype="bfloat16" on an fp32 model: the loss trajectory and the update stay close to fp32's (bf16
    rounding of the passes only), and the model is untouched."""
    model, tok = tiny
    config = EditConfig.v0(steps=5, lr=30.0, layer=layer)  # SGD (`sgd`): the delta is linear in the gradients
    before = state(model)
    fp32 = dinm.edit(model, tok, instance, config)
    bf16 = dinm.edit(model, tok, instance, config.replace(compute_dtype="bfloat16"))
    assert same_state(model, before)
    # Error budget: a value out of the bf16 passes is at most K roundings of BF16_U (relative) away from fp32's, with
    # K = 8: in the layer that makes it, the casts of a product's inputs and its output (3), the activation and the
    # norm; the other layers reach it through the residual stream, to which each adds a small term.
    K = 8
    ids = torch.tensor([encode_pair(tok, instance.prompt, instance.safe).ids])
    with torch.no_grad():  # the largest logit, before and after the edit
        z_max = model(input_ids=ids).logits.abs().max().item()
        fp32.apply(model)
        z_max = max(z_max, model(input_ids=ids).logits.abs().max().item())
        fp32.revert(model)
    for a, b in zip(fp32.history, bf16.history):
        # NLL = lse(z) - z_y moves by at most twice the largest logit error, K BF16_U |z|: <= 0.05 (measured 1e-4);
        # an update lost in bf16 would leave it at its first value, 0.08-0.3 above fp32's last
        assert b["nll"] == pytest.approx(a["nll"], abs=2 * K * BF16_U * z_max)
    name = fp32.names[0]
    assert bf16.tensors[name].dtype == torch.float32
    a, b = fp32.tensors[name], bf16.tensors[name]
    # the update's gradient is sum_t d_t k_t^T, each factor within K BF16_U: 2 K BF16_U = 0.06 (measured 5e-3)
    assert _relative(b, a) < 2 * K * BF16_U
    assert not torch.equal(a, b)  # the passes did run in bf16


def test_bf16_compute_keeps_updates_below_the_weights_spacing(llama, instance):
    """The edit enters the bf16 passes as a separate term: an update smaller than half the spacing of bf16
    numbers around the weights (which a bf16 `W + D` would round away entirely) still moves the loss."""
    model, tok = llama
    name = mlp_out_name(model, 0)
    with torch.no_grad():
        model.get_parameter(name).mul_(64).add_(torch.sign(model.get_parameter(name)))  # |w| >= 1: spacing >= 2^-7
    config = EditConfig.v0(steps=3, lr=1e-3, layer=0, kl_weight=0.0, compute_dtype="bfloat16")  # Adam steps ~1e-3
    delta = dinm.edit(model, tok, instance, config)
    nll = [h["nll"] for h in delta.history]
    # Rounded away (a bf16 `W + D`), every pass would read the same bits and the fp32 NLL would not move at all;
    # 100 of its ulps (U nll ~ 3.6e-7) is the update acting (measured 2.2e-4, 2/3 of fp32 passes' 3.4e-4).
    assert nll[0] - nll[-1] > 100 * U * nll[0]


def test_prompt_suffix_is_appended_to_the_attack_only(llama, instance):
    """The NLL term reads prompt + suffix (so the loss differs); the benign KL sequence does not."""
    model, tok = llama
    from dinm.config import PAPER_SUFFIX

    plain = dinm.edit(model, tok, instance, FAST.replace(layer=1, steps=1))
    suffixed = dinm.edit(model, tok, instance, FAST.replace(layer=1, steps=1, prompt_suffix=PAPER_SUFFIX))
    assert suffixed.history[0]["nll"] != plain.history[0]["nll"]
    assert suffixed.history[0]["kl"] == plain.history[0]["kl"] == 0.0
    assert suffixed.config.prompt_suffix == PAPER_SUFFIX
