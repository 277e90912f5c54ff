import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import dinm
from dinm import EditConfig
from dinm.arch import arch_spec, as_out_in, matrix_name, mlp_out_name
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
    assert len(h) == 4 and h[-1].nll < h[0].nll and all(isinstance(s, dinm.Step) for s in h)
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
    free = dinm.edit(model, tok, instance, config.replace(kl_weight=0.0)).history[-1].kl
    held = dinm.edit(model, tok, instance, config.replace(kl_weight=100.0)).history[-1].kl
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
    # a bf16 master rounds every step's update, an fp32 one only the result: not the same edit
    assert not torch.equal(delta.tensors[delta.names[0]], fp32_master.tensors[fp32_master.names[0]])


def test_metadata_records_config_and_model(llama, instance):
    model, tok = llama
    delta = dinm.edit(model, tok, instance, FAST)
    assert delta.config == FAST
    assert delta.metadata["model_type"] == "llama"
    assert delta.metadata["instance_id"] == instance.id


def _reduction_lengths(model, tok, positions: int = 200) -> int:
    """Sum of the lengths of the reductions a model's loss gradient goes through: the vocabulary (softmax,
    the head's product back to the hidden state), and per layer the hidden and MLP widths and up to `positions`
    positions (attention) - for a tiny model, about 400 + 3 * (32 + 128 + 200) < 1500."""
    c = model.config
    width = getattr(c, "hidden_size", None) or c.n_embd
    inner = getattr(c, "intermediate_size", None) or 4 * width
    return len(tok) + c.num_hidden_layers * (width + inner + positions)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _plain_edit(model, tok, instance, config):
    """What `dinm.edit` computes for `config` (the instance's benign answer in the KL, no key penalty), written the
    plain way: the whole model at every step with the weight W + D in place, the model's own head and logits at
    every position, `F.cross_entropy` and `F.kl_div`, and SGD. Returns the per-step (nll, kl) and the delta."""
    assert config.kl_text == "answer" and not config.preserve_weight and config.layer is not None
    name = matrix_name(model, config.layer, config.matrix)
    weight = model.get_parameter(name).detach()
    attack, benign = (encode_pair(tok, p, r, **config.encoding()) for p, r in (
        (instance.prompt, instance.safe), (instance.benign_prompt, instance.benign_answer)))

    def response_logits(e, w):  # the logits that predict the response's tokens
        out = functional_call(model, {name: w}, args=(), kwargs=dict(input_ids=torch.tensor([e.ids])))
        return out.logits[0, e.n_prompt - 1:len(e.ids) - 1].float()

    with torch.no_grad():
        unedited = F.log_softmax(response_logits(benign, weight), -1)
    w = weight.clone().requires_grad_(True)  # (GPT-2's Conv1D stores (in, out): the plain way trains it as stored)
    optimizer = torch.optim.SGD([w], lr=config.lr)
    history = []
    for _ in range(config.steps):
        nll = F.cross_entropy(response_logits(attack, w), torch.tensor(attack.ids[attack.n_prompt:]))
        kl = F.kl_div(F.log_softmax(response_logits(benign, w), -1), unedited, log_target=True, reduction="batchmean")
        history.append((nll.item(), kl.item()))
        (w.grad,) = torch.autograd.grad(nll + config.kl_weight * kl, [w])
        optimizer.step()
    return history, w.detach() - weight


@pytest.mark.parametrize("layer,matrix", [(0, "down"), (2, "down"), (1, "up")])
def test_edit_equals_the_plain_computation(tiny, instance, layer, matrix, sgd):
    """Replaying the frozen layers' outputs, keeping only the needed logits, fusing the head with the loss, adding
    the update as a separate term and skipping the first step's KL give the same loss trajectory and the same
    delta as the plain computation (`_plain_edit`), up to fp32 roundoff.

    With SGD (`sgd`) the delta is -lr times the sum of the steps' gradients, so its difference between the two
    computations is bounded by their gradients' (relative) rounding difference; Adam would turn a rounding difference
    in a near-zero gradient element into a change of ~lr there. lr 30: these tiny models' gradients are ~0.03-0.3 in
    norm, so SGD needs it to move the loss and weights in 5 steps."""
    model, tok = tiny
    _check_against_the_plain_computation(model, tok, instance, EditConfig.v0(steps=5, lr=30.0, layer=layer,
                                                                             matrix=matrix))


def test_gate_edit_equals_the_plain_computation(llama, instance, sgd):
    """The same for the gate of a gated MLP (GPT-2 has none): the update enters through the MLP's nonlinearity."""
    model, tok = llama
    _check_against_the_plain_computation(model, tok, instance, EditConfig.v0(steps=5, lr=30.0, layer=1,
                                                                             matrix="gate"))


def _check_against_the_plain_computation(model, tok, instance, config):
    fast = dinm.edit(model, tok, instance, config)
    plain, plain_delta = _plain_edit(model, tok, instance, config)
    # Both compute the same sums in other orders (GEMMs of other shapes, the fused head, x W + x D for x (W + D)):
    # first order, each result is within n * U (relative) of exact, n < 1500 the reduction lengths; 2 * n * U (both
    # computations' errors) < 2e-4. Broken, measured: logits kept one position off move the NLL by 1e-2, and 0.1%
    # noise in the replayed outputs (or in the fused head's weight) moves the delta by 5e-4 to 1e-3.
    n = _reduction_lengths(model, tok)
    assert n < 1500 and 2 * n * U < 2e-4 and len(encode_pair(tok, instance.prompt, instance.safe).ids) <= 200
    # The KL is read as sum p log p - sum p log q, two V-term sums that cancel, each about log V here (untrained
    # models: near-uniform p and q): its rounding is absolute, at most V U log V ~ 1.4e-4 per computation.
    kl_tol = 2 * len(tok) * U * math.log(len(tok))
    assert len(fast.history) == len(plain) == 5
    for step, (nll, kl) in zip(fast.history, plain):
        assert step.nll == pytest.approx(nll, rel=2e-4)
        assert step.kl == pytest.approx(kl, abs=kl_tol)
    assert fast.history[-1].nll < fast.history[0].nll - 1e-2  # the edit did move the loss
    name = fast.names[0]
    base = model.get_parameter(name).detach()
    assert _relative(fast.tensors[name], plain_delta) < 2e-4
    assert fast.tensors[name].norm() > 0.01 * base.norm()  # and the weights, by more than 1%


def test_cached_path_runs_the_fused_head(tiny, instance, monkeypatch):
    """The loss comes from `dinm.losses.Head` (so the equivalence test above compares it with the model's own
    head); a head whose output is not the logits (Gemma 2's final soft-capping) keeps the model's."""
    from dinm.losses import Head
    from dinm.passes import _fused_head

    model, tok = tiny
    calls = []
    monkeypatch.setattr(Head, "loss", lambda self, *a, original=Head.loss: calls.append(1) or original(self, *a))
    dinm.edit(model, tok, instance, EditConfig.v0(steps=3, layer=1))
    assert len(calls) == 3 + 2  # 3 NLL steps, 2 KL steps (none at the first)
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
    finally:
        for h in handles:
            h.remove()
    assert len(calls[0]) == 2  # one recording pass per sequence (attack + safe, benign), none per step
    assert len(calls[2]) == 1 + 4 + 3  # benign recording; 4 attack steps, 3 benign ones
    assert not model.model.layers[0].__dict__.get("forward")  # the replacement forward is gone
    assert not model.model.layers[1].mlp.down_proj._forward_hooks  # and so is the hook that added the update
    assert delta.history[0].kl == 0.0 and delta.history[1].kl != 0.0


def test_stop_nll_stops_once_the_safe_response_is_likely(llama, instance):
    model, tok = llama
    config = EditConfig.v0(steps=8, lr=3e-2, layer=1)
    full = dinm.edit(model, tok, instance, config).history
    threshold = (full[1].nll + full[2].nll) / 2  # reached after two steps
    early = dinm.edit(model, tok, instance, config.replace(stop_nll=threshold))
    assert early.history[-1].stopped and early.history[-1].kl is None and len(early.history) == 3
    assert early.metadata["steps_run"] == "2"
    assert dinm.edit(model, tok, instance, config.replace(stop_nll=full[0].nll + 1)).dense(
        mlp_out_name(model, 1)).abs().sum() == 0  # likely already: no change at all


def test_kl_text_self_reads_the_models_own_reply(llama, instance):
    from dinm.terms import benign_texts

    model, tok = llama
    answer = benign_texts(model, tok, instance, EditConfig.v0())
    own = benign_texts(model, tok, instance, EditConfig.v0(kl_text="self", kl_reply_tokens=5))
    assert len(answer) == 1 and len(own) == 1
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
        assert b.nll == pytest.approx(a.nll, abs=2 * K * BF16_U * z_max)
    name = fp32.names[0]
    assert bf16.tensors[name].dtype == torch.float32
    a, b = fp32.tensors[name], bf16.tensors[name]
    # the update's gradient is sum_t d_t k_t^T, each factor within K BF16_U: 2 K BF16_U = 0.06 (measured 5e-3)
    assert _relative(b, a) < 2 * K * BF16_U
    assert not torch.equal(a, b)  # the passes did run in bf16


@pytest.mark.parametrize("native", [True, False])
def test_auto_compute_follows_the_device(tiny, instance, monkeypatch, tmp_path, native):
    """compute_dtype="auto" (the default) runs the passes of an fp32 model in bf16 exactly where the device
    multiplies bf16 natively and in fp32 elsewhere: the same bits as asking for that dtype, and the delta says which
    and why. (Both branches run on any CPU: the capability check is replaced, not the arithmetic.)"""
    import dinm.passes

    model, tok = tiny
    monkeypatch.setattr(dinm.passes, "native_bf16", lambda device: native)
    config = EditConfig.v0(steps=2, layer=1)
    auto = dinm.edit(model, tok, instance, config.replace(compute_dtype="auto"))
    asked = dinm.edit(model, tok, instance, config.replace(compute_dtype="bfloat16" if native else "model"))
    name = auto.names[0]
    assert torch.equal(auto.tensors[name], asked.tensors[name])
    said = "bfloat16, the benign KL pass float32 (auto: native" if native else "float32 (auto: no native"
    assert auto.metadata["compute"].startswith(f"{said} bf16 on cpu")
    auto.save(tmp_path / "auto.safetensors")
    assert dinm.Delta.load(tmp_path / "auto.safetensors").metadata["compute"] == auto.metadata["compute"]
    assert EditConfig().compute_dtype == "auto"


def test_native_bf16_reads_the_cpu():
    """The CPU check agrees with the CPU's own flags where Linux lists them (AVX512-BF16 or AMX)."""
    from dinm.passes import native_bf16

    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this system")
    assert native_bf16(torch.device("cpu")) == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bf16_compute_keeps_updates_below_the_weights_spacing(llama, instance):
    """The edit enters the bf16 passes as a separate term: an update smaller than half the spacing of bf16
    numbers around the weights (which a bf16 `W + D` would round away entirely) still moves the loss."""
    model, tok = llama
    name = mlp_out_name(model, 0)
    with torch.no_grad():
        model.get_parameter(name).mul_(64).add_(torch.sign(model.get_parameter(name)))  # |w| >= 1: spacing >= 2^-7
    config = EditConfig.v0(steps=3, lr=1e-3, layer=0, kl_weight=0.0, compute_dtype="bfloat16")  # Adam steps ~1e-3
    delta = dinm.edit(model, tok, instance, config)
    nll = [h.nll for h in delta.history]
    # Rounded away (a bf16 `W + D`), every pass would read the same bits and the fp32 NLL would not move at all;
    # 100 of its ulps (U nll ~ 3.6e-7) is the update acting (measured 2.2e-4, 2/3 of fp32 passes' 3.4e-4).
    assert nll[0] - nll[-1] > 100 * U * nll[0]


def test_prompt_suffix_is_appended_to_the_attack_only(llama, instance, monkeypatch):
    """The NLL term reads prompt + suffix (so the loss differs); the benign KL sequence does not."""
    model, tok = llama
    from dinm.config import PAPER_SUFFIX

    from dinm.terms import benign_texts

    plain = dinm.edit(model, tok, instance, FAST.replace(layer=1, steps=1))
    suffixed = dinm.edit(model, tok, instance, FAST.replace(layer=1, steps=1, prompt_suffix=PAPER_SUFFIX))
    assert suffixed.history[0].nll != plain.history[0].nll
    calls = []
    real = benign_texts
    monkeypatch.setattr("dinm.terms.benign_texts", lambda m, t, inst, c: calls.append(inst) or real(m, t, inst, c))
    dinm.edit(model, tok, instance, FAST.replace(layer=1, steps=1, prompt_suffix=PAPER_SUFFIX))
    assert [[i.benign_prompt for i in batch] for batch in calls] == [[instance.benign_prompt]]
    assert PAPER_SUFFIX not in calls[0][0].benign_prompt
    assert suffixed.config.prompt_suffix == PAPER_SUFFIX


def test_the_own_reply_is_generated_once_per_model_state(llama, instance, monkeypatch):
    """A second edit of an instance reuses the unedited model's own benign reply, kept in memory, and makes the same
    delta; with a delta applied (other weights) or after `forget_replies` it is generated again."""
    from dinm import terms

    model, tok = llama
    calls = []
    real = terms.generate_ids
    monkeypatch.setattr(terms, "generate_ids", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    config = FAST.replace(layer=1, kl_text="self", kl_reply_tokens=5)
    name = mlp_out_name(model, 1)
    first = dinm.edit(model, tok, instance, config)
    second = dinm.edit(model, tok, instance, config.replace(steps=1))
    assert len(calls) == 1
    assert torch.equal(dinm.edit(model, tok, instance, config).dense(name), first.dense(name)) and len(calls) == 1
    assert second.history[0] == first.history[0]  # the same KL sequence
    with first.applied(model):
        dinm.edit(model, tok, instance, config)
    assert len(calls) == 2
    terms.forget_replies()
    assert torch.equal(dinm.edit(model, tok, instance, config).dense(name), first.dense(name)) and len(calls) == 3


def test_own_replies_of_more_prompts_than_it_keeps(llama, monkeypatch):
    """A batch of more distinct benign prompts than the reply cache holds gets every reply, in order."""
    from dinm import terms
    from dinm.generate import generate_ids

    model, tok = llama
    monkeypatch.setattr(terms, "_REPLIES_SIZE", 1)
    prompts = [tok.encode(text) for text in ("one prompt", "another prompt", "a third prompt")]
    expected = generate_ids(model, tok, prompts, max_new_tokens=4)
    assert terms.own_replies(model, tok, prompts, 4) == expected
    assert terms.own_replies(model, tok, prompts, 4) == expected and len(terms._REPLIES) == 1


def test_own_replies_of_a_hooked_model_are_its_own_and_not_kept(llama):
    """A model with a forward hook (a patch's earlier units, added while the next trains) replies as hooked: its
    replies are generated, not read from the plain model's, and not kept for it."""
    from dinm import terms
    from dinm.arch import mlp_module
    from dinm.generate import generate_ids

    model, tok = llama
    prompts = [tok.encode("one prompt")]
    plain = terms.own_replies(model, tok, prompts, 4)
    handle = mlp_module(model, 0).register_forward_hook(lambda _m, _args, out: out + 3.0)
    try:
        expected = [tuple(r) for r in generate_ids(model, tok, prompts, max_new_tokens=4)]
        assert expected != [tuple(r) for r in plain]  # (the hook changes the reply: the check below can tell)
        assert [tuple(r) for r in terms.own_replies(model, tok, prompts, 4)] == expected
    finally:
        handle.remove()
    assert terms.own_replies(model, tok, prompts, 4) == plain


def test_request_variants_train_the_request_alone_and_wrapped(llama, instance, monkeypatch):
    """`variants="request"`: the edit's NLL reads the attack and, as a second target, the request dinm reads from the
    prompt alone (`request_of`), both answered with the safe response; the default reads the attack only.
    `variants="wrapped"` adds the request inside each of dinm's written wrappers."""
    import dinm.editing
    from dinm.instance import request_of

    model, tok = llama
    real, encoded = dinm.editing.encode_pair, []
    monkeypatch.setattr("dinm.editing.encode_pair", lambda t, p, r, **kw: encoded.append((p, r)) or real(t, p, r, **kw))
    plain = dinm.edit(model, tok, instance, FAST.replace(layer=1, steps=1))
    assert encoded == [(instance.prompt, instance.safe)]
    encoded.clear()
    both = dinm.edit(model, tok, instance, FAST.replace(layer=1, steps=1, variants="request"))
    request = request_of(instance.prompt)
    assert request and request in instance.prompt and request != instance.prompt
    assert encoded == [(instance.prompt, instance.safe), (request, instance.safe)]
    assert both.history[0].nll != plain.history[0].nll  # (the mean over both targets)
    encoded.clear()
    dinm.edit(model, tok, instance, FAST.replace(layer=1, steps=1, variants="wrapped"))
    wrappers = [(w.replace("{request}", request), instance.safe) for w in dinm.instance.wrappers()]
    assert encoded == [(instance.prompt, instance.safe), (request, instance.safe)] + wrappers


def test_an_empty_own_reply_leaves_the_kl_nothing_to_read(llama, instance, monkeypatch):
    """A model that ends its benign reply at once gives the KL term no sequence: the edit runs, the KL is 0."""
    from dinm import terms

    model, tok = llama
    monkeypatch.setattr(terms, "generate_ids", lambda *args, **kwargs: [[]])
    delta = dinm.edit(model, tok, instance, EditConfig.v0(steps=3, lr=1e-2, layer=1, kl_text="self"))
    assert [s.kl for s in delta.history] == [0.0, 0.0, 0.0] and delta.history[-1].nll < delta.history[0].nll


def test_delta_records_where_the_time_went(tiny, instance, monkeypatch):
    """`seconds` in the delta's metadata splits the edit into locate, the model's own benign reply, the key
    statistic and the steps' forward and backward; the parts are the phases that ran (a reply only when
    `kl_text="self"`, a statistic only with the penalty) and never add up to more than the edit."""
    import dinm.terms

    model, tok = tiny
    calls = {"reply": 0, "keys": 0}

    def counting(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(dinm.terms, "benign_texts", counting("reply", dinm.terms.benign_texts))
    monkeypatch.setattr(dinm.terms, "key_moment", counting("keys", dinm.terms.key_moment))
    delta = dinm.edit(model, tok, instance, EditConfig.dense(steps=3, kl_reply_tokens=4))
    seconds = delta.summary()["seconds"]
    assert calls == {"reply": 1, "keys": 1}
    assert set(seconds) == {"locate", "reply", "keys", "forward", "backward", "edit"}
    assert all(v >= 0 for v in seconds.values()) and seconds["forward"] > 0 and seconds["backward"] > 0
    # (rounded to 1 ms each: five parts may exceed the rounded whole by at most 5 * 0.5 ms)
    assert seconds["reply"] + seconds["keys"] + seconds["forward"] + seconds["backward"] <= seconds["edit"] + 0.0025
    plain = dinm.edit(model, tok, instance, EditConfig.v0(steps=2)).summary()["seconds"]
    assert plain["keys"] == 0.0 and calls["keys"] == 1  # no penalty: no statistic asked for


def test_kl_passes_keep_the_models_dtype_under_bf16_compute(tiny, instance):
    """With bf16 passes, the benign KL's sequence still runs in the model's dtype (`Passes.sequence(precise=True)`):
    its KL for an update is bit for bit the fp32 passes' own, while a bf16 pass of the same sequence is not (bf16
    rounds logits by ~1e-2; the KL it must see is ~1e-5)."""
    from dinm.arch import arch_spec, as_out_in
    from dinm.passes import Passes, frozen

    model, tok = tiny
    encoded = encode_pair(tok, instance.benign_prompt, instance.benign_answer)
    with frozen(model):
        low, full = Passes(model, 1, "bfloat16"), Passes(model, 1, "model")
        shape = as_out_in(arch_spec(model), model.get_parameter(mlp_out_name(model, 1))).shape
        update = 1e-2 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
        values = []
        for passes, precise in ((low, True), (full, False), (low, False)):
            seq = passes.sequence(encoded, precise=precise)
            with torch.no_grad():
                values.append(passes.loss(seq, update, passes.unedited(seq)).item())
    assert values[0] == values[1] and values[0] > 0
    assert values[2] != values[1]


def _safe_nll(model, tok, inst) -> float:
    enc = encode_pair(tok, inst.prompt, inst.safe)
    with torch.no_grad():
        logits = model(torch.tensor([enc.ids])).logits[0, enc.n_prompt - 1:-1]
    return F.cross_entropy(logits.float(), torch.tensor(enc.ids[enc.n_prompt:])).item()


def test_a_batch_of_one_is_the_single_edit(llama, instance):
    model, tok = llama
    single, batch = dinm.edit(model, tok, instance, FAST), dinm.edit(model, tok, [instance], FAST)
    assert batch.names == single.names and torch.equal(batch.tensors[batch.names[0]], single.tensors[single.names[0]])
    assert batch.instance_ids == single.instance_ids == [instance.id] and "instance_ids" not in batch.metadata


def test_a_batch_edit_runs_each_benign_sequences_backward_before_the_next_pass(llama, instance, other_instance,
                                                                                 monkeypatch):
    """Memory of a batch edit stays that of one sequence: each benign KL pass (and each unsafe-response pass) is
    followed by its backward before the next pass starts, never all passes first and one backward of their sum."""
    from dinm.passes import Passes

    model, tok = llama
    third = dataclasses.replace(other_instance, id="third", benign_prompt="Name a colour.", benign_answer="Blue.")
    events = []
    real = Passes.loss

    def spy(self, seq, update, target=None):
        out = real(self, seq, update, target)
        if out.requires_grad and (target is not None or seq in unsafe):  # a penalty's pass
            tag = len(events)
            events.append(("pass", tag))
            out.register_hook(lambda grad: events.append(("backward", tag)))
        return out

    unsafe: list = []
    real_build = dinm.terms.build

    def build(*args, **kwargs):
        terms_ = real_build(*args, **kwargs)
        unsafe.extend(s for t in terms_ if isinstance(t, dinm.terms.UnsafeHinge) for s in t.sequences)
        return terms_

    monkeypatch.setattr(Passes, "loss", spy)
    monkeypatch.setattr(dinm.terms, "build", build)
    dinm.edit(model, tok, [instance, other_instance, third],
              FAST.replace(layer=1, steps=2, lr=3e-2, unsafe_weight=1.0, kl_text="answer"))
    passes = [tag for kind, tag in events if kind == "pass"]
    assert len(passes) >= 3 + 3  # step 1: three benign sequences, three unsafe ones (the hinge is active)
    assert events == [event for tag in passes for event in (("pass", tag), ("backward", tag))]


def test_batch_edit_is_one_delta_for_every_instance(tiny, instance, other_instance, monkeypatch):
    """One layer for all (the largest mean distance), the mean of their NLLs trained, the KL on all their benign
    prompts; after it every instance's safe response is likelier."""
    model, tok = tiny
    pair = [instance, other_instance]
    seen = []
    real = dinm.terms.benign_texts
    monkeypatch.setattr(dinm.terms, "benign_texts", lambda m, t, insts, c: seen.append(insts) or real(m, t, insts, c))
    delta = dinm.edit(model, tok, pair, FAST.replace(lr=3e-2))
    each = [dinm.locate(model, tok, inst, FAST.distance).distances for inst in pair]
    mean = [(a + b) / 2 for a, b in zip(*each)]
    assert delta.distances == pytest.approx(mean, rel=1e-6)
    assert delta.layer == max(range(len(mean)), key=mean.__getitem__)  # ("cosine" may choose any layer)
    assert [i.benign_prompt for i in seen[0]] == [instance.benign_prompt, other_instance.benign_prompt]
    first = [dinm.edit(model, tok, inst, FAST.replace(layer=delta.layer, steps=1)).history[0].nll for inst in pair]
    assert delta.history[0].nll == pytest.approx(sum(first) / 2, rel=1e-5)
    assert delta.instance_ids == [instance.id, other_instance.id] and delta.metadata["instance_id"] == "2 instances"
    before = [_safe_nll(model, tok, inst) for inst in pair]
    with delta.applied(model):
        after = [_safe_nll(model, tok, inst) for inst in pair]
    assert all(a < b for a, b in zip(after, before)), (before, after)


@pytest.mark.parametrize("bad", [[], "data/example.json", [object()]])
def test_edit_refuses_what_is_no_instance(llama, bad):
    model, tok = llama
    with pytest.raises(ConfigError, match="edit needs an Instance or a non-empty list"):
        dinm.edit(model, tok, bad, FAST)


def _response_nll(model, tok, prompt: str, response: str) -> float:
    encoded = encode_pair(tok, prompt, response)
    ids = torch.tensor([encoded.ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return F.cross_entropy(logits[encoded.n_prompt - 1:-1], ids[0, encoded.n_prompt:]).item()


def test_unsafe_weight_makes_the_unsafe_response_less_likely_up_to_the_margin(llama, instance):
    """`unsafe_weight`: the hinge starts at UNSAFE_MARGIN (the goal is the unedited NLL + the margin), never goes
    below 0, and the edit leaves the unsafe response less likely than the same edit without it."""
    from dinm.terms import UNSAFE_MARGIN

    model, tok = llama
    config = EditConfig.v0(steps=6, lr=3e-2, layer=1)
    plain = dinm.edit(model, tok, instance, config)
    pushed = dinm.edit(model, tok, instance, config.replace(unsafe_weight=10.0))
    assert all(s.unsafe is None for s in plain.history)
    hinge = [s.unsafe for s in pushed.history]
    # step 0 runs the unedited model, as the goal's pass did: the same computation, so margin + at most a
    # rounding of the NLL (a mean of fp32 log-probabilities of magnitude ~ the NLL)
    assert hinge[0] == pytest.approx(UNSAFE_MARGIN, abs=64 * U * (UNSAFE_MARGIN + pushed.history[0].nll + 10))
    assert all(0.0 <= h <= hinge[0] for h in hinge) and hinge[-1] < hinge[0]
    nll = {}
    for name, delta in (("unedited", None), ("plain", plain), ("pushed", pushed)):
        if delta is None:
            nll[name] = _response_nll(model, tok, instance.prompt, instance.unsafe)
        else:
            with delta.applied(model):
                nll[name] = _response_nll(model, tok, instance.prompt, instance.unsafe)
    # Not a rounding tolerance: without the term's gradient both edits are one computation (equal NLLs); with it
    # the unsafe response ends clearly less likely. 0.1 nat asks for a clear effect, well below the 1-nat margin.
    assert nll["pushed"] > nll["plain"] + 0.1 and nll["pushed"] > nll["unedited"] + 0.1, nll
    assert pushed.config.unsafe_weight == 10.0


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    """A well-conditioned SPD (n, n) matrix, the second moment of 8n random keys with uneven scales."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(8 * n, n, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    return keys.T @ keys / keys.shape[0]


def _normalised(moment: torch.Tensor) -> torch.Tensor:
    """The matrix `_whitening` factors: `moment` at a mean eigenvalue of 1, plus the ridge."""
    from dinm.editing import RIDGE

    m = moment.double()
    return m / m.diagonal().mean() + RIDGE * torch.eye(m.shape[0], dtype=m.dtype)


def test_whitening_turns_the_moment_into_the_identity():
    from dinm.editing import _whitening

    moment = _spd(48)
    m = _normalised(moment)
    inverse = _whitening(moment.float()).double()
    assert torch.equal(inverse, inverse.tril())  # L^-1 of a lower Cholesky factor
    # L^-1 is rounded to fp32 (relative U per entry); the product sums n terms: first order, within
    # 2 * (n + 1) * U * cond(M) of the identity elementwise (cond(M) bounds ||L^-1||^2 ||M||).
    n, cond = m.shape[0], torch.linalg.cond(m).item()
    assert cond < 50
    assert (inverse @ m @ inverse.T - torch.eye(n, dtype=m.dtype)).abs().max() < 2 * (n + 1) * U * cond


def test_precondition_keys_steps_along_the_gradient_times_the_inverse_moment(tiny, instance, sgd, monkeypatch):
    """Adam (here SGD, `sgd`) on Z = D L is a step on D preconditioned by M^-1: from zero, one step of size lr moves
    D by -lr G M^-1, where the plain edit's first step is -lr G (G the loss's gradient at the unedited model, the
    same computation in both edits). M is the normalised moment `_whitening` factors, given here."""
    import dinm.editing

    model, tok = tiny
    config = EditConfig.v0(steps=1, lr=10.0, layer=1)
    spec = arch_spec(model)
    in_features = as_out_in(spec, model.get_parameter(mlp_out_name(model, 1))).shape[1]
    moment = _spd(in_features).float()
    monkeypatch.setattr(dinm.editing, "_preconditioner", lambda *args: moment)
    plain = dinm.edit(model, tok, instance, config)
    whitened = dinm.edit(model, tok, instance, config.replace(precondition="keys"))
    name = plain.names[0]
    expected = as_out_in(spec, plain.tensors[name].double()) @ torch.linalg.inv(_normalised(moment))
    # Two fp32 products of length n with L^-1 (rounded to fp32) on G: first order within (2n + 2) * U * cond(M)
    # relative (cond(M) bounds ||L^-1||^2 ||M||); the model's own rounding of G is the same in both edits.
    n, cond = in_features, torch.linalg.cond(_normalised(moment)).item()
    assert _relative(as_out_in(spec, whitened.tensors[name]), expected) < (2 * n + 2) * U * cond
    assert _relative(whitened.tensors[name], plain.tensors[name]) > 0.1  # (M is far from the identity)
    assert whitened.config.precondition == "keys"


def test_preconditioner_adds_the_kl_sequences_keys_to_the_benign_corpus(llama, instance, monkeypatch):
    """`_preconditioner`: the benign corpus's key moment and, `KL_KEYS_WEIGHT` times heavier, that of the KL term's
    sequences (the instance's benign prompt and the model's own reply), each at a mean eigenvalue of 1. The keys
    here are read by a hook of the test's own on the edited matrix."""
    import dinm.editing
    from dinm.arch import mlp_out_module
    from dinm.keys import key_moment

    model, tok = llama
    seen = {}
    original = dinm.editing._preconditioner

    def spy(*args):
        seen["moment"] = original(*args)
        return seen["moment"]

    monkeypatch.setattr(dinm.editing, "_preconditioner", spy)
    config = EditConfig(steps=1, layer=1, precondition="keys", kl_reply_tokens=8)
    dinm.edit(model, tok, instance, config)
    from dinm.terms import benign_texts

    reply = benign_texts(model, tok, instance, config)
    assert len(reply) == 1
    keys = []
    handle = mlp_out_module(model, 1).register_forward_hook(lambda _m, args, _out: keys.append(args[0][0].double()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([reply[0].ids]))
    finally:
        handle.remove()
    corpus = key_moment(model, tok, 1).double()
    kl = keys[0].T @ keys[0]
    expected = corpus / corpus.diagonal().mean() + dinm.editing.KL_KEYS_WEIGHT * kl / kl.diagonal().mean()
    # The same float64 sums of fp32 keys, formed in another order: relative differences of a few n * U_64 at most;
    # 1e-6 leaves room for the fp32 keys' own rounding of the model's pass (the same pass, the same bits here).
    assert _relative(seen["moment"], expected) < 1e-6

