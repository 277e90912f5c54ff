"""Low-rank edits: the factored delta form, `EditConfig(rank=r)`, truncation, and the PEFT LoRA export checked
with the real `peft` package (installed by the `test` extra)."""

import copy
import json
import math
import os
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import dinm
from dinm import Delta, EditConfig
from dinm.arch import as_out_in, arch_spec, mlp_out_module, mlp_out_name
from dinm.delta import FORMAT, header_checksum
from dinm.errors import ConfigError, DeltaError, DinmError
from dinm.export import load_peft, lora_factors, to_peft
from dinm.lowrank import compose, rank_for_energy, truncate
from dinm_cli import main

from conftest import make_delta, same_state, state
from test_edit import _reduction_lengths

U = 2.0 ** -24  # fp32 unit roundoff


def _bound_dot(n: int, *products: torch.Tensor) -> torch.Tensor:
    """Higham's bound on a computed length-n sum of products: |fl(sum) - sum| <= gamma_n sum |terms|, with
    gamma_n = n U / (1 - n U); `products` are the sums of |terms| (|x| @ |W|^T and the like)."""
    gamma = n * U / (1 - n * U)
    return gamma * sum(products)


# ------------------------------------------------------------------------------------------------ compose, truncate
def test_compose_is_the_product_in_a_fixed_order_whatever_the_threads_and_layout():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(40, 7, generator=g), torch.randn(7, 300, generator=g)
    one = compose(up, down)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = compose(up.t().contiguous().t(), down.t().contiguous().t())  # (column-major copies)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, single)
    # the same value as a matrix product, within the rounding of a length-7 sum
    exact = up.double() @ down.double()
    assert ((one.double() - exact).abs() <= _bound_dot(8, up.double().abs() @ down.double().abs())).all()


def test_truncation_error_is_the_frobenius_error_of_what_it_returns():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(50, 80, generator=g) @ torch.diag(torch.logspace(0, -3, 80)).float()
    for rank in (1, 4, 50):
        t = truncate(d, rank=rank)
        assert t.up.shape == (50, rank) and t.down.shape == (rank, 80)
        measured = ((d.double() - t.up.double() @ t.down.double()).norm() / d.double().norm()).item()
        # the factors are fp32 copies of a float64 SVD: a relative perturbation of a few U per element
        assert measured == pytest.approx(t.error, abs=1e-5)
    assert truncate(d, rank=50).error == pytest.approx(0.0, abs=1e-6)  # full rank: nothing dropped
    exact_rank2 = torch.randn(30, 2, generator=g) @ torch.randn(2, 40, generator=g)
    assert truncate(exact_rank2, energy=0.999).rank == 2
    assert truncate(exact_rank2, rank=2).error < 1e-6


def test_energy_picks_the_smallest_rank_holding_it():
    s = torch.tensor([3.0, 2.0, 1.0])  # squares 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1 and rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert rank_for_energy(s, 1.0) == 3
    with pytest.raises(ConfigError, match="energy"):
        rank_for_energy(s, 0.0)
    with pytest.raises(ConfigError, match="rank or an energy"):
        truncate(torch.ones(2, 2))


# ------------------------------------------------------------------------------------------------ the factored delta
def test_factored_delta_round_trips_and_reverts_every_bit(tiny, tmp_path):
    model, _ = tiny
    before = state(model)
    delta = make_delta(model, rank=3)
    name = delta.names[0]
    assert delta.form(name) == "factored" and delta.described[name]["rank"] == 3 and name not in delta.tensors
    path = tmp_path / "d.safetensors"
    delta.save(path)
    loaded = Delta.load(path)
    assert loaded.metadata["format"] == FORMAT == "dinm.delta.v4"
    loaded.apply(model)
    up, down = loaded.factors(name)
    expected = (before[name].float() + compose(up, down)).to(before[name].dtype)
    assert torch.equal(model.get_parameter(name).detach(), expected)
    loaded.revert(model)
    assert same_state(model, before)
    summary = loaded.summary()["tensors"][name]
    assert summary["form"] == "factored" and summary["stored_bytes"] == 4 * 3 * sum(summary["shape"])


def test_a_factored_delta_applies_to_a_checkpoint_on_disk_and_reverts_every_byte(tiny_folder, llama, tmp_path):
    from dinm import apply_delta

    from conftest import checkpoint_tensors

    model, _ = llama  # the same weights as tiny_folder's
    delta = make_delta(model, rank=2, scale=0.3)
    name = delta.names[0]
    out = tmp_path / "edited"
    apply_delta(delta, tiny_folder, str(out))
    with delta.applied(model):
        assert torch.equal(checkpoint_tensors(out)[name], model.get_parameter(name).detach())
    apply_delta(delta, str(out), revert=True)
    original = checkpoint_tensors(tiny_folder)
    assert all(torch.equal(v, original[k]) for k, v in checkpoint_tensors(out).items())
    delta.save(tmp_path / "d.safetensors")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "d.safetensors")])
    assert result.exit_code == 0 and "factored, rank 2" in result.output, result.output


def test_a_factored_delta_is_far_smaller_than_the_dense_one(llama):
    model, _ = llama
    dense, factored = make_delta(model), make_delta(model, rank=2)
    name = dense.names[0]
    assert factored.summary()["tensors"][name]["stored_bytes"] * 4 < dense.summary()["tensors"][name]["stored_bytes"]


def _resave(delta, path, change):
    """Write `delta` to `path` after `change(tensors, described)`, every checksum recomputed (a file that was
    damaged and then re-checksummed)."""
    from dinm.delta import _digest

    tensors = {k: v.clone() for k, v in delta.tensors.items()}
    described = delta.described
    change(tensors, described)
    for name in described:
        described[name]["delta_sha256"] = _digest(tensors, name)
    metadata = {**delta.metadata, "tensors": json.dumps(described, sort_keys=True)}
    metadata["checksum"] = header_checksum(metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_a_damaged_factor_is_refused_even_when_every_checksum_is_recomputed(llama, tmp_path):
    model, _ = llama
    before = state(model)
    delta = make_delta(model, rank=2)
    name = delta.names[0]
    path = tmp_path / "d.safetensors"

    def damage(tensors, _described):
        tensors[name + ":up"][0, 0] += 1.0

    _resave(delta, path, damage)
    loaded = Delta.load(path)  # its checksums agree with its (damaged) contents ...
    with pytest.raises(DeltaError, match="damaged"):  # ... but applying it does not give the recorded weights
        loaded.apply(model)
    assert same_state(model, before)
    delta.save(path)
    with open(path, "r+b") as f:  # a flipped byte in the stored factor `up`, checksums left alone
        header_len = int.from_bytes(f.read(8), "little")
        start, _ = json.loads(f.read(header_len))[name + ":up"]["data_offsets"]
        f.seek(8 + header_len + start + 5)
        byte = f.read(1)
        f.seek(8 + header_len + start + 5)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(DeltaError, match="corrupt"):
        Delta.load(path)


@pytest.mark.parametrize("change, message", [
    (lambda t, d, n: t.pop(n + ":down"), "both factors"),
    (lambda t, d, n: t.__setitem__(n + ":up", t[n + ":up"].double()), "factors of"),
    (lambda t, d, n: t.__setitem__(n + ":up", t[n + ":up"][:, :1].contiguous()), "factors of"),
    (lambda t, d, n: d[n].__setitem__("rank", 0), "rank >= 1"),
    (lambda t, d, n: t.__setitem__(n + ":up", t[n + ":up"] * float("nan")), "NaN"),
    (lambda t, d, n: t.__setitem__(n, torch.zeros(d[n]["shape"])), "does not describe"),
])
def test_malformed_factored_deltas_are_refused_naming_what_is_wrong(llama, tmp_path, change, message):
    model, _ = llama
    delta = make_delta(model, rank=2)
    name = delta.names[0]
    path = tmp_path / "d.safetensors"
    _resave(delta, path, lambda t, d: change(t, d, name))
    with pytest.raises(DeltaError, match=message):
        Delta.load(path)


def test_older_formats_still_read_and_cannot_hold_factors(llama, tmp_path):
    from dinm.delta import _digest

    model, _ = llama
    before = state(model)
    for old in ("dinm.delta.v2", "dinm.delta.v1"):
        for delta in (make_delta(model, scale=3.0), make_delta(model, rank=2, scale=3.0)):
            name = delta.names[0]
            tensors = {k: v.long() if k.endswith(":revert_index") else v for k, v in delta.tensors.items()}
            assert name + ":revert_index" in tensors  # (a large update: some elements need one)
            described = delta.described
            described[name]["delta_sha256"] = _digest(tensors, name)  # as the older dinm wrote it: int64 positions
            metadata = {**delta.metadata, "format": old, "tensors": json.dumps(described, sort_keys=True)}
            metadata.pop("checksum")
            if old == "dinm.delta.v2":
                metadata["checksum"] = header_checksum(metadata)
            path = tmp_path / f"{old}.safetensors"
            save_file(tensors, str(path), metadata=metadata)
            if delta.factors(name) is None:
                loaded = Delta.load(path)
                with loaded.applied(model):
                    pass
                assert same_state(model, before)
            else:
                with pytest.raises(DeltaError, match="malformed"):
                    Delta.load(path)
        # int32 positions are v3's: an older file holding them is refused
        dense = make_delta(model, scale=3.0)
        metadata = {k: v for k, v in dense.metadata.items() if k != "checksum"}
        metadata["format"] = old
        if old == "dinm.delta.v2":
            metadata["checksum"] = header_checksum(metadata)
        save_file(dense.tensors, str(path), metadata=metadata)
        with pytest.raises(DeltaError, match="revert index"):
            Delta.load(path)


# ------------------------------------------------------------------------------------------------ EditConfig(rank=r)
def test_rank_edit_trains_a_factored_update_of_that_rank(tiny, instance):
    model, tok = tiny
    before = state(model)
    config = EditConfig(layer=1, steps=8, lr=2e-2, rank=2, kl_text="answer", preserve_weight=0.0)
    delta = dinm.edit(model, tok, instance, config, progress=False)
    assert same_state(model, before)
    name = delta.names[0]
    assert delta.form(name) == "factored" and delta.described[name]["rank"] == 2
    assert delta.config.rank == 2
    # rank 2 up to the fp32 rounding of composing it: by Weyl, the 3rd singular value is at most the rounding
    # error's norm, elementwise <= 3 U (|up| @ |down|) (two products and a sum, each rounded once)
    up, down = delta.factors(name)
    singular = torch.linalg.svdvals(delta.dense(name).double())
    assert singular[2] <= 3 * U * (up.double().abs() @ down.double().abs()).norm() < 1e-4 * singular[1]
    assert delta.history[-1].nll < delta.history[0].nll - 1e-2  # the edit moved the loss
    with delta.applied(model):
        pass
    assert same_state(model, before)


def test_rank_edit_starts_from_the_unedited_model_and_is_seeded(llama, instance):
    model, tok = llama
    config = EditConfig(layer=1, steps=3, rank=2, kl_text="answer", preserve_weight=0.0)
    a = dinm.edit(model, tok, instance, config, progress=False)
    b = dinm.edit(model, tok, instance, config, progress=False)
    dense = dinm.edit(model, tok, instance, config.replace(rank=None, matrix="down"), progress=False)
    assert a.history[0].nll == dense.history[0].nll  # B = 0: the first pass is the unedited model's
    name = a.names[0]
    assert all(torch.equal(x, y) for x, y in zip(a.factors(name), b.factors(name)))


def test_rank_factors_start_where_the_nll_falls_fastest_per_unit_of_benign_change():
    """A's rows start as the top generalized eigenvectors of (G^T G, M): for each, |G a|^2 / (a^T M a) is the
    eigenvalue (M-orthogonal to each other); without M, the top right singular vectors of G."""
    from dinm.arch import ARCHITECTURES
    from dinm.editing import RIDGE, _Factored

    g = torch.Generator().manual_seed(0)
    grad = torch.randn(12, 20, generator=g)
    keys = torch.randn(200, 20, generator=g) * torch.logspace(0, -2, 20)  # (benign keys: uneven directions)
    moment = keys.t() @ keys / 200
    weight = torch.zeros(12, 20)
    f = _Factored(ARCHITECTURES["llama"], weight, 3, grad, moment)
    assert f.a.shape == (3, 20) and f.b.shape == (12, 3) and not f.b.any()
    assert torch.allclose(f.a.norm(dim=1), torch.full((3,), math.sqrt(20 / 3)))
    m = moment.double() + RIDGE * moment.double().diagonal().mean() * torch.eye(20, dtype=torch.float64)
    root_inv = torch.linalg.inv(torch.linalg.cholesky(m))  # L^-1
    values = torch.linalg.eigvalsh(root_inv @ grad.double().t() @ grad.double() @ root_inv.t()).flip(0)
    a = f.a.detach().double()
    ratio = (grad.double() @ a.t()).pow(2).sum(0) / ((a @ m) * a).sum(1)
    # (fp32 storage of A: each ratio within a few U relative of its eigenvalue; 1e-4 is far from any gap here)
    assert torch.allclose(ratio, values[:3], rtol=1e-4) and values[2] > 1.01 * values[3]
    gram = a @ m @ a.t()
    assert (gram - torch.diag(gram.diagonal())).abs().max() < 1e-4 * gram.diagonal().max()
    plain = _Factored(ARCHITECTURES["llama"], weight, 2, grad)
    v = torch.linalg.svd(grad.double())[2][:2]
    assert torch.allclose((plain.a.detach().double() @ v.t()).abs() / math.sqrt(20 / 2), torch.eye(2,
                                                                                                  dtype=torch.float64),
                          atol=1e-5)


def test_rank_is_checked(llama, instance):
    model, tok = llama
    with pytest.raises(ConfigError, match="rank"):
        EditConfig(rank=0)
    with pytest.raises(ConfigError, match="rank 33 exceeds"):  # a 32 x 64 matrix has rank 32 at most
        dinm.edit(model, tok, instance, EditConfig(layer=1, steps=1, rank=33), progress=False)


# ------------------------------------------------------------------------------------------------ PEFT export
# The tests below load adapters with the real peft (the `test` extra installs it; missing, they fail, not skip).


def _module_input(model, module, ids):
    """The input of `model`'s module named `module` on `ids`."""
    seen = {}
    handle = model.get_submodule(module).register_forward_hook(lambda _m, args, _out: seen.update(x=args[0]))
    try:
        model(ids)
    finally:
        handle.remove()
    return seen["x"].detach()


def _check_adapter(model, deltas, folder, ids, n_total):
    """The adapter loaded by PEFT against the deltas applied with `Delta.apply`: each edited module's output within
    the rounding bound of the two computations, the logits within 2 n U relative (n: the summed lengths of the
    reductions a logit goes through), and merge_and_unload's weights within the rounding of W + B A."""
    spec = arch_spec(model)
    applied = copy.deepcopy(model)
    for d in deltas:
        d.apply(applied)
    adapted = load_peft(copy.deepcopy(model), folder)
    with torch.no_grad():
        want_logits, got_logits = applied(ids).logits, adapted(ids).logits
    for d in deltas:
        name = d.names[0]
        module = name.rpartition(".")[0]
        x = _module_input(applied, module, ids)
        with torch.no_grad():  # the same input through both modules (PEFT's LoRA wrapper adds the adapter)
            want, got = applied.get_submodule(module)(x), adapted.base_model.model.get_submodule(module)(x)
        w = as_out_in(spec, model.get_parameter(name).detach()).double()
        b, a, _, _ = lora_factors(d, name)
        dw = as_out_in(spec, d.dense(name)).double()
        x = x.double()
        n = w.shape[1] + b.shape[1] + 2
        bound = _bound_dot(n, x.abs() @ (w.abs() + dw.abs()).T, (x.abs() @ a.double().abs().T) @ b.double().abs().T)
        bound = bound + U * (x.abs() @ (w + dw).abs().T)  # (W + D rounded to fp32 once)
        assert ((got.double() - want.double()).abs() <= 2 * bound + 1e-30).all()
    rel = ((got_logits.double() - want_logits.double()).norm() / want_logits.double().norm()).item()
    assert rel <= 2 * n_total * U, rel
    merged = adapted.merge_and_unload()
    for d in deltas:
        name = d.names[0]
        b, a, _, _ = lora_factors(d, name)
        w = model.get_parameter(name).detach().double()
        ab = as_out_in(spec, (b.double().abs() @ a.double().abs()))  # (in the parameter's layout)
        bound = _bound_dot(b.shape[1] + 2, ab) + U * (w.abs() + ab)
        diff = (merged.get_parameter(name).detach().double() - applied.get_parameter(name).detach().double()).abs()
        assert (diff <= 2 * bound).all()


def test_factored_deltas_export_exactly_to_one_peft_adapter(tiny, tmp_path):
    model, tok = tiny
    before = state(model)
    deltas = [make_delta(model, 0, rank=3, scale=0.3), make_delta(model, 2, rank=2, seed=1, scale=0.3)]
    folder = tmp_path / "adapter"
    written = to_peft(deltas, folder)
    assert [(w.layer, w.rank, w.exact, w.error) for w in written] == [(0, 3, True, 0.0), (2, 2, True, 0.0)]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 3
    assert config["layers_to_transform"] == [0, 2] and config["target_modules"] in (["mlp.down_proj"],
                                                                                    ["mlp.c_proj"])
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = sorted(f.keys())
        assert f.get_tensor(keys[0]).shape[0] == 3 or f.get_tensor(keys[0]).shape[1] == 3  # padded to r = 3
    module = mlp_out_name(model, 0).rpartition(".")[0]
    assert f"base_model.model.{module}.lora_A.weight" in keys and len(keys) == 4
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2]])
    _check_adapter(model, deltas, folder, ids, _reduction_lengths(model, tok, 16))
    assert same_state(model, before)


@pytest.mark.parametrize("kind", ["rows", "columns"])
def test_masked_deltas_export_exactly_at_the_rank_of_their_mask(tiny, tmp_path, kind):
    """A delta stored masked (k changed rows or columns: a unit edit's) exports with no truncation at rank k: B @ A
    is the update bit for bit (one stored value times 1 plus zeros), in the parameter's layout on every
    architecture, GPT-2's Conv1D included; PEFT's adapter computes what the applied delta does."""
    model, tok = tiny
    template = make_delta(model, 1, scale=0.3)
    name = template.names[0]
    base = model.get_parameter(name).detach()
    edited = base.clone()
    g = torch.Generator().manual_seed(0)
    if kind == "rows":
        edited[[1, 4]] += 0.3 * torch.randn(2, base.shape[1], generator=g)
    else:
        edited[:, [1, 4]] += 0.3 * torch.randn(base.shape[0], 2, generator=g)
    delta = Delta.from_weights({name: (base, edited)},
                               {k: template.metadata[k] for k in ("model_type", "base_model", "layer")})
    assert delta.form(name) == kind
    written = to_peft([delta], tmp_path / "adapter")
    assert [(w.rank, w.exact, w.error) for w in written] == [(2, True, 0.0)]
    b, a, _, _ = lora_factors(delta, name)
    assert torch.equal(b @ a, as_out_in(arch_spec(model), delta.dense(name)).float())
    _check_adapter(model, [delta], tmp_path / "adapter", torch.tensor([[1, 5, 9, 20, 33, 7, 2]]),
                   _reduction_lengths(model, tok, 16))
    assert [w.rank for w in to_peft([delta], tmp_path / "r1", rank=1)] == [1]  # (asked for less: truncated)


def test_deltas_of_the_mlps_input_side_export_with_their_own_modules(llama, tmp_path):
    """A gate delta exports as a LoRA of the gate (`EditConfig.matrix`); beside a delta of another matrix, the
    adapter names each module whole, so that PEFT adds no matrix to a layer the deltas did not edit."""
    model, tok = llama
    before = state(model)
    gate = make_delta(model, 0, rank=2, scale=0.3, matrix="gate")
    written = to_peft([gate], tmp_path / "gate")
    config = json.loads((tmp_path / "gate" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["mlp.gate_proj"] and config["layers_to_transform"] == [0]
    assert [(w.module, w.exact) for w in written] == [("model.layers.0.mlp.gate_proj", True)]
    deltas = [gate, make_delta(model, 2, rank=2, seed=1, scale=0.3)]
    to_peft(deltas, tmp_path / "both")
    config = json.loads((tmp_path / "both" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.mlp.gate_proj", "model.layers.2.mlp.down_proj"]
    assert config["layers_to_transform"] is None and config["layers_pattern"] is None
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2]])
    adapted = load_peft(copy.deepcopy(model), tmp_path / "both")
    lora = sorted(n for n, m in adapted.named_modules() if hasattr(m, "lora_A"))
    assert lora == ["base_model.model.model.layers.0.mlp.gate_proj", "base_model.model.model.layers.2.mlp.down_proj"]
    _check_adapter(model, deltas, tmp_path / "both", ids, _reduction_lengths(model, tok, 16))
    assert same_state(model, before)


def test_a_dense_delta_exports_by_truncated_svd_with_its_error(llama, tmp_path):
    model, tok = llama
    delta = make_delta(model, 1, scale=0.3)
    name = delta.names[0]
    with pytest.raises(ConfigError, match="rank"):
        to_peft([delta], tmp_path / "none")
    assert not (tmp_path / "none").exists()
    written = to_peft([delta], tmp_path / "r4", rank=4)
    b, a, error, exact = lora_factors(delta, name, rank=4)
    assert not exact and written[0].rank == 4 and written[0].error == pytest.approx(error)
    # the adapter is the rank-4 truncation: the printed error is its distance to the dense update
    truncated = Delta.from_factors({name: (model.get_parameter(name).detach(), b, a)},
                                   {k: delta.metadata[k] for k in ("model_type", "base_model", "layer")})
    d = delta.dense(name).double()
    measured = ((d - truncated.dense(name).double()).norm() / d.norm()).item()
    assert measured == pytest.approx(error, abs=1e-5) and 0 < error < 1
    _check_adapter(model, [truncated], tmp_path / "r4", torch.tensor([[3, 4, 5, 6]]),
                   _reduction_lengths(model, tok, 16))
    full = to_peft([delta], tmp_path / "all", energy=1.0)
    assert full[0].rank == 32 and full[0].error < 1e-6


def test_deltas_of_one_matrix_add_up_in_the_adapter(llama, tmp_path):
    model, tok = llama
    first = make_delta(model, 1, rank=2, scale=0.3)
    second_base = copy.deepcopy(model)
    first.apply(second_base)
    second = make_delta(second_base, 1, rank=1, seed=3, scale=0.3)  # made on top of the first
    written = to_peft([first, second], tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 3
    assert [w.rank for w in written] == [2, 1]
    both = copy.deepcopy(model)
    first.apply(both)
    second.apply(both)
    adapted = load_peft(copy.deepcopy(model), tmp_path / "a")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    want, got = both(ids).logits.double(), adapted(ids).logits.double()
    assert ((got - want).norm() / want.norm()).item() <= 2 * _reduction_lengths(model, tok, 16) * U


def test_export_refuses_what_it_cannot_write_and_writes_nothing(llama, tmp_path, tokenizer):
    model, _ = llama
    delta = make_delta(model, rank=2)
    other = dinm.Delta.from_factors({delta.names[0]: (model.get_parameter(delta.names[0]).detach(),
                                                      *delta.factors(delta.names[0]))},
                                    {"model_type": "llama", "base_model": "another", "layer": "1"})
    with pytest.raises(ConfigError, match="different models"):
        to_peft([delta, other], tmp_path / "x")
    not_mlp = Delta.from_weights({"model.layers.1.self_attn.o_proj.weight": (torch.zeros(32, 32), torch.ones(32, 32))},
                                 {"model_type": "llama", "base_model": "", "layer": "1"})
    with pytest.raises(DeltaError, match="not an MLP matrix an edit trains"):
        to_peft([not_mlp], tmp_path / "x", rank=1)
    (tmp_path / "exists").mkdir()
    with pytest.raises(DeltaError, match="exists"):
        to_peft([delta], tmp_path / "exists")
    assert sorted(os.listdir(tmp_path)) == ["exists"]  # nothing half-written


def test_cli_export_prints_the_error_and_refuses_bad_input(llama, tmp_path):
    model, _ = llama
    dense, factored = make_delta(model, 1, scale=0.3), make_delta(model, 2, rank=2)
    dense.save(tmp_path / "dense.safetensors")
    factored.save(tmp_path / "factored.safetensors")
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(tmp_path / "dense.safetensors"), str(tmp_path / "factored.safetensors"),
                                  "-o", str(tmp_path / "adapter"), "--rank", "4"])
    assert result.exit_code == 0, result.output
    assert "rank 4, truncated SVD, relative Frobenius error 0." in result.output and \
        "exact (factored or masked delta)" in result.output
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] == [1, 2]
    result = runner.invoke(main, ["export", str(tmp_path / "dense.safetensors"), "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and "dinm: error:" in result.output and "--rank" in result.output
    result = runner.invoke(main, ["export", str(tmp_path / "dense.safetensors"), "-o", str(tmp_path / "adapter"),
                                  "--rank", "2"])
    assert result.exit_code == 2 and "exists" in result.output
    result = runner.invoke(main, ["export", str(tmp_path / "dense.safetensors"), "-o", str(tmp_path / "c"),
                                  "--rank", "2", "--energy", "0.9"])
    assert result.exit_code == 2 and "either --rank or --energy" in result.output
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_loading_an_adapter_without_peft_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as if it were not installed
    with pytest.raises(DinmError, match=r"pip install 'dinm\[peft\]'"):
        load_peft(torch.nn.Linear(2, 2), tmp_path)


def test_embedded_model_adapter_matches_the_applied_delta(smol, tmp_path):
    """On the real SmolLM2 (30 layers, vocabulary 49152): a factored delta at layer 20 and a dense one at layer 22
    truncated to rank 8, exported into one adapter, against both deltas applied."""
    model, tok = smol
    before = state(model)
    factored = make_delta(model, 20, rank=4, scale=0.05)
    dense = make_delta(model, 22, scale=0.05)
    name = dense.names[0]
    b, a, error, _ = lora_factors(dense, name, rank=8)
    truncated = Delta.from_factors({name: (model.get_parameter(name).detach(), b, a)},
                                   {k: dense.metadata[k] for k in ("model_type", "base_model", "layer")})
    written = to_peft([factored, dense], tmp_path / "adapter", rank=8)
    assert [w.exact for w in written] == [True, False] and written[1].error == pytest.approx(error)
    ids = tok("How do I kill a stuck process on Linux?", return_tensors="pt").input_ids
    _check_adapter(model, [factored, truncated], tmp_path / "adapter", ids,
                   _reduction_lengths(model, tok, ids.shape[1]))
    assert same_state(model, before)
    assert math.isfinite(error)


def test_cli_edit_rank_writes_a_factored_delta_that_exports_exactly(tiny_folder, tmp_path):
    runner = CliRunner()
    out = tmp_path / "d.safetensors"
    result = runner.invoke(main, ["edit", tiny_folder, "--instance", os.path.join(os.path.dirname(__file__), "..",
                                                                                  "data", "example.json"),
                                  "-o", str(out), "--layer", "1", "--steps", "2", "--rank", "3"])
    assert result.exit_code == 0, result.output
    delta = Delta.load(out)
    assert delta.form(delta.names[0]) == "factored" and delta.config.rank == 3
    result = runner.invoke(main, ["export", str(out), "-o", str(tmp_path / "adapter")])
    assert result.exit_code == 0 and "rank 3, exact (factored or masked delta)" in result.output, result.output
    assert runner.invoke(main, ["edit", tiny_folder, "--instance", "x.json", "-o", str(tmp_path / "e"),
                                "--rank", "0"]).exit_code == 2
