"""`EditConfig(matrix="unit")` (`dinm.unit`): one MLP unit repurposed as a thresholded detector. What the edit
computes through its hook is what its delta writes into the weights; only that unit changes; its gate probe and
its hinge do what they say; where the MLP has no gate it is refused in one line."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import dinm
from dinm import EditConfig, editing
from dinm.export import PREFIX, to_peft
from dinm.errors import ArchitectureError, ConfigError
from dinm.unit import MARGIN, Unit, UnitHinge, adding_unit, fit_gate

from conftest import _gpt2, _llama, same_state, state

U = torch.finfo(torch.float32).eps / 2


def test_unit_config_is_checked_and_round_trips():
    config = EditConfig.unit()
    assert (config.matrix, config.variants, config.steps, config.lr) == ("unit", "request", 40, 1e-2)
    assert EditConfig.from_json(config.to_json()) == config
    with pytest.raises(ConfigError, match="rank=2"):
        EditConfig(matrix="unit", rank=2)
    with pytest.raises(ConfigError, match="precondition='keys'"):
        EditConfig.unit(precondition="keys", steps=20)


def test_unit_edit_changes_one_unit_and_its_delta_is_what_the_edit_trained(llama, instance, tmp_path):
    """The delta changes one row of the gate and of the up matrix and one column of the output matrix, the same
    unit j, and nothing else; the model with it applied computes what the edit's hook computed (so the loss the
    edit descended is that of the delta's model); apply then revert restores every bit. It is stored as those rows
    and that column alone, and exports as a LoRA exactly: each update has rank 1, the stored row (column) beside a
    one-hot factor, so B @ A is the update bit for bit, with or without asking for rank 1."""
    model, tok = llama
    before = state(model)
    delta = dinm.edit(model, tok, instance, EditConfig.unit(steps=4, layer=1))
    assert same_state(model, before)
    j = int(delta.metadata["unit"])
    names = [f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
    assert sorted(delta.names) == sorted(names)
    assert all(step.off is not None and step.moved is not None for step in delta.history)
    # stored as the unit's rows and column alone: gate/up row-masked, down column-masked
    assert [delta.form(n) for n in names] == ["rows", "rows", "columns"]
    assert all(delta.tensors[n].numel() == model.get_parameter(n).shape[1 if n != names[2] else 0] for n in names)
    with delta.applied(model):
        after = {n: model.get_parameter(n).detach().clone() for n in names}
        ids = torch.tensor([dinm.text.encode_pair(tok, instance.prompt, instance.safe).ids])
        applied = model(input_ids=ids).logits
    assert same_state(model, before)
    for name in names:
        changed = (after[name] != before[name]).nonzero()
        where = changed[:, 1] if name.endswith("down_proj.weight") else changed[:, 0]
        assert changed.numel() and (where == j).all(), name
    unit = Unit(model, 1, j)
    update = torch.stack([after[names[0]][j] - unit.g0, after[names[1]][j] - unit.u0, after[names[2]][:, j] - unit.v0])
    with adding_unit(unit, update):
        hooked = model(input_ids=ids).logits
    assert same_state(model, before)
    # The hook adds the new unit's output and subtracts the old one's: the same sums as the applied weights' MLP in
    # another order. fp32, reduction lengths <= 64 (the MLP's width) per product and 3 layers above: each logit is
    # within a few hundred U of the exact value relative to the activations' scale (~1 here); 1e-4 leaves room, and
    # a unit off by one index or a sign moves these logits by 1e-2 or more.
    assert torch.allclose(hooked, applied, rtol=1e-4, atol=1e-4), (hooked - applied).abs().max()
    plain = model(input_ids=ids).logits
    assert (plain - applied).abs().max() > 1e-3  # (and the edit did change them)
    for rank, folder in ((None, tmp_path / "adapter"), (1, tmp_path / "adapter1")):
        exported = to_peft([delta], folder, rank=rank)
        assert sorted(e.module for e in exported) == [n.removesuffix(".weight") for n in sorted(names)]
        assert all(e.rank == 1 and e.exact and e.error == 0.0 for e in exported), exported
        tensors = load_file(folder / "adapter_model.safetensors")
        for name in names:
            b, a = (tensors[f"{PREFIX}{name.removesuffix('.weight')}.lora_{x}.weight"] for x in "BA")
            assert torch.equal(b @ a, delta.dense(name).float()), name


def test_fit_gate_separates_positives_from_negatives():
    """On separable inputs (negatives around one mean, positives shifted along a direction; no bias), the probe's
    squared hinge falls to under 1% of the seed row's (200: every point at 0), with every positive above the
    margin's half and every negative below zero (the hinge's optimum needs |g| large along the shift, which 300 steps
    reach only in part: what remains is on the few negatives nearest the positives)."""
    g = torch.Generator().manual_seed(0)
    center = torch.randn(32, generator=g)
    negative = center + 0.3 * torch.randn(2000, 32, generator=g)
    direction = torch.randn(32, generator=g)
    positive = center + 0.3 * torch.randn(3, 32, generator=g) + 2.0 * direction / direction.norm()

    def hinge(row):
        return (F.relu(negative @ row + MARGIN).pow(2).mean() + F.relu(MARGIN - positive @ row).pow(2).mean()).item()

    row = fit_gate(positive, negative, torch.zeros(32))
    assert hinge(row) < 0.01 * hinge(torch.zeros(32))
    assert (positive @ row).min() > MARGIN / 2
    assert (negative @ row).max() < 0


def test_unit_hinge_is_the_mean_squared_excess_over_minus_the_margin(llama):
    """UnitHinge = mean max(0, g . x + MARGIN)^2 with g the updated gate row: 0 for a row far below on every x,
    the formula otherwise (checked for the unit as it is and for a changed row)."""
    model, _ = llama
    unit = Unit(model, 0, 5)
    x = 1 + 0.5 * torch.randn(100, unit.g0.shape[0], generator=torch.Generator().manual_seed(0))
    hinge = UnitHinge(1.0, unit, x)
    for row in (unit.g0, unit.g0 + 3 * x[0] / x[0].norm()):
        update = torch.zeros(3, unit.g0.shape[0])
        update[0] = row - unit.g0
        want = F.relu(x @ row + MARGIN).pow(2).mean().item()
        assert want > 0
        assert next(hinge.pieces(update)).item() == pytest.approx(want, rel=1e-5)
    far = torch.zeros(3, unit.g0.shape[0])
    far[0] = -torch.ones(unit.g0.shape[0]) - unit.g0  # g . x = -sum(x), about -32 +- 3 here: below -MARGIN
    assert (x @ (unit.g0 + far[0])).max() < -MARGIN
    assert next(hinge.pieces(far)).item() == 0.0


def test_unit_edit_needs_a_gated_mlp(tokenizer, instance):
    model = _gpt2(len(tokenizer))
    with pytest.raises(ArchitectureError, match="gated MLP"):
        dinm.edit(model, tokenizer, instance, EditConfig.unit(steps=1, layer=0))


def test_the_default_edit_is_two_units_on_a_gated_mlp_and_the_dense_one_elsewhere(tokenizer, instance):
    """EditConfig() edits two units of a Llama (gated MLP) with the units' steps and lr, and the output projection of
    a GPT-2 with the dense edit's; each delta stores the config it ran, not "auto"."""
    llama, gpt2 = _llama(len(tokenizer)), _gpt2(len(tokenizer))
    unit_delta = dinm.edit(llama, tokenizer, instance, EditConfig(layer=1, steps=1))
    assert len(unit_delta.units) == 2 and len(unit_delta.names) == 3  # (two units of layer 1: its three matrices)
    assert unit_delta.config == EditConfig.two_units(layer=1, steps=1)
    dense_delta = dinm.edit(gpt2, tokenizer, instance, EditConfig(layer=1, steps=1))
    assert dense_delta.names == ["transformer.h.1.mlp.c_proj.weight"] and "unit" not in dense_delta.metadata
    assert dense_delta.config == EditConfig.dense(layer=1, steps=1)
    # A batch's default is the dense edit on any architecture (by the rule it beat one unit for all and a unit per
    # instance on SafeEdit: README, "Batch editing, measured").
    patch = dinm.edit(llama, tokenizer, [instance, instance], EditConfig(layer=1, steps=1))
    assert patch.config == EditConfig.dense(layer=1, steps=1) and len(patch.names) == 1


def test_a_batch_unit_edit_is_one_unit_for_all_the_instances(llama, instance, other_instance):
    """`matrix="unit"` on a list (without `unit_per_instance`) trains one unit on every instance: one gate row, up
    row and down column, the history's NLL the mean of both instances' (the patch of units below starts from each
    instance's own)."""
    model, tok = llama
    config = EditConfig.unit(steps=1, layer=1)
    both = dinm.edit(model, tok, [instance, other_instance], config)
    first = dinm.edit(model, tok, instance, config)
    second = dinm.edit(model, tok, other_instance, config)
    assert not both.units and both.layers == [1] and both.metadata["unit"].isdigit()
    down = both.dense("model.layers.1.mlp.down_proj.weight")
    assert int(both.metadata["unit"]) in down.abs().sum(0).nonzero().flatten().tolist()
    assert (down.abs().sum(0) > 0).sum() == 1  # one column
    # Step 0 is before any update: the model with the repurposed unit's old output removed. All three edits chose
    # the same unit, so it is one model, and the NLLs agree up to float32 summation order.
    assert both.metadata["unit"] == first.metadata["unit"] == second.metadata["unit"]
    assert both.history[0].nll == pytest.approx((first.history[0].nll + second.history[0].nll) / 2, rel=1e-5)


def test_a_batch_unit_edit_is_a_patch_of_one_unit_per_instance(llama, instance, other_instance):
    """`unit_per_instance` on a list repurposes one unit per instance, each the instance's own single edit: with both
    instances' benign prompts the same (so the first unit's negatives are its single edit's) the first unit's
    vectors are those of the single edit of the first instance, bit for bit; the second is another unit of the same
    layer, trained on the model with the first added: its first NLL is the second instance's NLL under the first
    unit's single edit applied. One delta writes both, stored as their two rows and columns; apply then revert
    restores every bit."""
    import dataclasses

    model, tok = llama
    second = dataclasses.replace(other_instance, benign_prompt=instance.benign_prompt)
    config = EditConfig.unit(steps=3, layer=1, unit_per_instance=True)
    before = state(model)
    patch = dinm.edit(model, tok, [instance, second], config)
    single = dinm.edit(model, tok, instance, config)
    assert same_state(model, before)
    units = patch.units
    assert [u["instance_id"] for u in units] == [instance.id, second.id] and patch.layers == [1] == [patch.layer]
    assert units[0]["unit"] == int(single.metadata["unit"]) != units[1]["unit"]
    assert patch.config == config and patch.instance_ids == [instance.id, second.id]
    names = [f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
    assert sorted(patch.names) == sorted(names) and [patch.form(n) for n in names] == ["rows", "rows", "columns"]
    j, k = units[0]["unit"], units[1]["unit"]
    for name in names:
        full, one = patch.dense(name), single.dense(name)
        mine, other = (full[:, j], full[:, k]) if name == names[2] else (full[j], full[k])
        assert torch.equal(mine, one[:, j] if name == names[2] else one[j]), name
        assert other.abs().max() > 0, name
        rest = full.clone()
        if name == names[2]:
            rest[:, [j, k]] = 0
        else:
            rest[[j, k]] = 0
        assert not rest.any(), name
    # The second unit trained on the model with the first: its first NLL is that of its own training (same unit,
    # negatives, probe) on the model with the first unit's delta applied (weights written, not a hook: the same sums
    # in another order; fp32 through 3 layers, as above: 1e-4 relative), and the first unit moved it by more.
    def second_nll():
        run = editing._train(model, tok, [second], config, False, {1: {j}}, [instance, second])
        assert run.trained.unit.j == k
        return run.history[0].nll

    with single.applied(model):
        assert second_nll() == pytest.approx(units[1]["nll_first"], rel=1e-4)
    alone = second_nll()
    assert abs(alone - units[1]["nll_first"]) > 1e-3 * alone, (alone, units[1]["nll_first"])
    assert len(patch.history) == 3 and patch.history[0].nll == pytest.approx(
        (units[0]["nll_first"] + units[1]["nll_first"]) / 2)
    with patch.applied(model):
        assert not same_state(model, before)
    assert same_state(model, before)


def test_two_units_are_the_request_units_edit_then_a_wrapped_unit_on_top(llama, instance, other_instance):
    """`variants="request+wrapped"` trains two units of one edit: the first is `EditConfig.unit()`'s single edit, bit
    for bit; the second another unit, trained on the request inside dinm's wrappers too, on the model with the first
    added (its first NLL is that training's with the first unit's delta applied: 1e-4 relative, as in the patch test
    above). The delta records both, and the config it ran."""
    model, tok = llama
    config = EditConfig.unit(steps=2, layer=1, kl_reply_tokens=4)  # (short own replies: each unit generates them)
    two = dinm.edit(model, tok, instance, config.replace(variants="request+wrapped"))
    single = dinm.edit(model, tok, instance, config)
    units = two.units
    assert [u["variants"] for u in units] == ["request", "wrapped"]
    assert [u["instance_id"] for u in units] == [instance.id] * 2 and two.config.variants == "request+wrapped"
    j, k = units[0]["unit"], units[1]["unit"]
    assert j == int(single.metadata["unit"]) != k
    for name in single.names:
        column = name.endswith("down_proj.weight")
        mine, one = two.dense(name), single.dense(name)
        assert torch.equal(mine[:, j] if column else mine[j], one[:, j] if column else one[j]), name
    with single.applied(model):
        run = editing._train(model, tok, [instance], config.replace(variants="wrapped"), False, {1: {j}}, [instance])
    assert run.trained.unit.j == k and run.history[0].nll == pytest.approx(units[1]["nll_first"], rel=1e-4)
    # (and on a list, two units for all: each trained on every instance)
    for_all = dinm.edit(model, tok, [instance, other_instance], config.replace(variants="request+wrapped", steps=1))
    assert [u["instance_ids"] for u in for_all.units] == [[instance.id, other_instance.id]] * 2


def test_a_patch_of_units_in_two_layers_is_what_their_hooks_compute_and_reverts_bit_for_bit(llama, tmp_path):
    """`unit.patch` with units in two layers (an edit locates each unit, so a patch may span layers): one delta writes
    both layers' rows and columns, lists both layers (and no single 'layer'), survives a save and load, gives the
    logits of the model with both units added through their hooks (weights written, not hooks: the same sums in
    another order, fp32 through 3 layers, 1e-4 relative as in the patch test above), and reverts to every bit."""
    from dinm import unit as unit_mod

    model, tok = llama
    torch.manual_seed(0)
    first, second = Unit(model, 1, 3), Unit(model, 2, 5)
    changes = [(first, 0.5 * torch.randn(3, first.g0.shape[0])), (second, 0.5 * torch.randn(3, second.g0.shape[0]))]
    units = [{"instance_id": "a", "layer": 1, "unit": 3, "steps_run": 1, "nll_first": 1.0, "nll_last": 0.5},
             {"instance_id": "b", "layer": 2, "unit": 5, "steps_run": 1, "nll_first": 1.0, "nll_last": 0.5}]
    path = str(tmp_path / "p.safetensors")
    unit_mod.patch(changes, {"layers": [1, 2], "units": units}).save(path)
    delta = dinm.Delta.load(path)
    assert delta.layers == [1, 2] and delta.layer is None and [u["layer"] for u in delta.units] == [1, 2]
    assert sorted(delta.names) == sorted(f"model.layers.{i}.mlp.{m}_proj.weight" for i in (1, 2)
                                         for m in ("gate", "up", "down"))
    ids = tok("a short benign sentence", return_tensors="pt").input_ids
    before = state(model)
    with torch.no_grad():
        plain = model(ids).logits
    with torch.no_grad(), adding_unit(*changes[0]), adding_unit(*changes[1]):
        hooked = model(ids).logits
    assert (hooked - plain).abs().max() > 1e-2 * plain.abs().max()  # (the units do change the output)
    with torch.no_grad(), delta.applied(model):
        written = model(ids).logits
    assert torch.allclose(written, hooked, rtol=1e-4, atol=1e-4 * hooked.abs().max().item())
    assert same_state(model, before)


def test_two_units_need_a_unit_edit(llama, instance):
    model, tok = llama
    with pytest.raises(ConfigError, match="matrix='down'"):
        EditConfig.dense(variants="request+wrapped")
    with pytest.raises(ConfigError, match="rank=4"):
        EditConfig(variants="request+wrapped", rank=4)
    with pytest.raises(ConfigError, match="has no gate"):
        EditConfig(variants="request+wrapped").resolved(gated=False)
    with pytest.raises(ConfigError, match="a list of instances"):  # (a list's "auto" is the dense patch)
        dinm.edit(model, tok, [instance, instance], EditConfig(variants="request+wrapped"))


def test_a_patchs_history_is_the_mean_over_the_units_still_running():
    """`_mean_history`: at each step the mean over the units that ran it; a unit that stopped early (`stop_nll`)
    drops out; where every unit has stopped, one stopped record, so `describe` says so; steps run = the most any
    unit ran."""
    from dinm import Step
    from dinm.history import describe, summary

    a = [Step(0, 4.0, kl=0.0, loss=4.0), Step(1, 2.0, kl=0.2, loss=3.0), Step(2, 1.0, stopped=True)]
    b = [Step(0, 2.0, kl=0.0, loss=2.0), Step(1, 1.5, kl=0.4, loss=2.0), Step(2, 1.0, kl=0.6, loss=1.5)]
    stopped_first = [Step(0, 0.5, stopped=True)]
    mean = editing._mean_history([a, b])
    assert mean == [Step(0, 3.0, kl=0.0, loss=3.0), Step(1, 1.75, kl=pytest.approx(0.3), loss=2.5),
                    Step(2, 1.0, kl=0.6, loss=1.5)]
    assert summary(mean)["steps_run"] == 3
    assert editing._mean_history([stopped_first, a])[0] == Step(0, 4.0, kl=0.0, loss=4.0)  # (the other ran on)
    both = editing._mean_history([stopped_first, [Step(0, 1.5, stopped=True)]])
    assert both == [Step(0, 1.0, stopped=True)] and "stopped early" in describe(both)


def test_reply_inputs_are_the_mlp_inputs_at_the_response_tokens_but_its_end(llama, instance):
    """`reply_inputs`: one row per response token but the end token (the positions whose outputs predict the
    response's second token on), the MLP inputs a forward of the whole prompt + response reads there. Causal
    attention: the shorter forward (without the end token) gives the same rows up to reduction order; fp32 through
    two layers of a model whose activations are ~1, so 1e-5 is some hundred U and a row off by one position is off
    by ~1."""
    from dinm.arch import mlp_module
    from dinm.trace import input_of
    from dinm.unit import reply_inputs

    model, tok = llama
    encoded = [dinm.text.encode_pair(tok, p, instance.safe) for p in (instance.prompt, "a short request")]
    rows = reply_inputs(model, 1, encoded)
    assert rows.shape[0] == sum(len(e.ids) - e.n_prompt - 1 for e in encoded)
    mlp = mlp_module(model, 1)
    with torch.no_grad():
        full = torch.cat([input_of(mlp, lambda: model(input_ids=torch.tensor([e.ids])))[0, e.n_prompt:-1]
                          for e in encoded])
    assert torch.allclose(rows, full, rtol=1e-5, atol=1e-5), (rows - full).abs().max()


def test_fit_gate_holds_the_reply_off_when_asked():
    """With `reply` (inputs near the positives, along the same shift, but apart in another direction), the probe
    keeps the positives above the margin's half and pushes the reply below zero (the negatives stay below but for
    the few nearest the positives, as in the test above); without it the reply, which the fit
    never sees, lands on the positives' side (the case `unit_reply_off` exists for: the reply's own tokens look like
    the request to the unit)."""
    g = torch.Generator().manual_seed(0)
    center = torch.randn(32, generator=g)
    negative = center + 0.3 * torch.randn(2000, 32, generator=g)
    shift, apart = torch.randn(32, generator=g), torch.randn(32, generator=g)
    shift, apart = shift / shift.norm(), apart - (apart @ shift) * shift / shift.norm() ** 2
    positive = center + 0.1 * torch.randn(3, 32, generator=g) + 2.0 * shift
    reply = center + 0.1 * torch.randn(20, 32, generator=g) + 2.0 * shift + 2.0 * apart / apart.norm()
    plain = fit_gate(positive, negative, torch.zeros(32))
    assert (reply @ plain).min() > 0
    held = fit_gate(positive, negative, torch.zeros(32), reply=reply)
    assert (positive @ held).min() > MARGIN / 2 and (reply @ held).max() < 0
    assert ((negative @ held) > 0).float().mean() < 0.01  # (300 steps leave a few negatives nearest the shift)


def test_unit_hinge_with_a_reply_adds_its_own_mean(llama):
    """UnitHinge(reply=...) yields the negatives' mean and the reply's mean (each its own: a short reply is not
    outweighed by a long corpus)."""
    model, _ = llama
    unit = Unit(model, 0, 5)
    g = torch.Generator().manual_seed(0)
    x = 1 + 0.5 * torch.randn(100, unit.g0.shape[0], generator=g)
    reply = 2 + torch.randn(7, unit.g0.shape[0], generator=g)
    update = torch.zeros(3, unit.g0.shape[0])
    update[0] = 3 * x[0] / x[0].norm()
    row = unit.g0 + update[0]
    pieces = [p.item() for p in UnitHinge(1.0, unit, x, reply).pieces(update)]
    want = [F.relu(s @ row + MARGIN).pow(2).mean().item() for s in (x, reply)]
    assert pieces == pytest.approx(want, rel=1e-5) and min(want) > 0


def test_unit_reply_off_keeps_the_trained_gate_lower_along_the_reply(llama, instance):
    """An edit with `unit_reply_off` ends with the unit's gate lower along the trained response than the same edit
    without (the probe and the hinge hold it there; nothing else differs: same unit, same seed); it is recorded in
    the delta's config; a response of one token (nothing after the last prompt token to hold) trains as without.
    Refused in one line where no unit is trained."""
    from dinm.unit import reply_inputs

    model, tok = llama
    config = EditConfig.unit(steps=3, layer=1, kl_reply_tokens=4, variants="none")
    plain = dinm.edit(model, tok, instance, config)
    held = dinm.edit(model, tok, instance, config.replace(unit_reply_off=True))
    assert held.config.unit_reply_off and not plain.config.unit_reply_off
    j = int(plain.metadata["unit"])
    assert int(held.metadata["unit"]) == j
    reply = reply_inputs(model, 1, [dinm.text.encode_pair(tok, instance.prompt, instance.safe)])
    name = "model.layers.1.mlp.gate_proj.weight"
    stored = model.get_parameter(name)[j].detach().float()
    excess = [F.relu(reply @ (stored + d.dense(name)[j].float()) + MARGIN).pow(2).mean().item() for d in (plain, held)]
    assert excess[1] < excess[0], excess
    one_token = config.replace(max_response_tokens=1, steps=1)
    short = dinm.edit(model, tok, instance, one_token.replace(unit_reply_off=True))
    assert all(math.isfinite(step.off) for step in short.history)  # (a one-token response leaves no reply to hold)
    without = dinm.edit(model, tok, instance, one_token)
    assert all(torch.equal(short.tensors[n], without.tensors[n]) for n in without.names)
    with pytest.raises(ConfigError, match="unit_reply_off"):
        EditConfig.dense(unit_reply_off=True)
    with pytest.raises(ConfigError, match="rank=2"):  # (refused as built, not later for the wrong reason)
        EditConfig(unit_reply_off=True, rank=2)
    with pytest.raises(ConfigError, match="has no gate"):
        EditConfig(unit_reply_off=True).resolved(gated=False)
    with pytest.raises(ConfigError, match="true or false"):
        EditConfig.unit(unit_reply_off="yes")


def test_prepare_holds_the_reply_in_the_probe_and_the_hinge_only_when_asked(llama, instance):
    """`unit.prepare(reply_off=True)` gives the hinge a second mean, over the targets' response positions but the last,
    and fits the probe with them (its gate row differs from the one fitted without); without it, one mean and the
    same unit."""
    from dinm import unit as unit_mod

    model, tok = llama
    targets = [dinm.text.encode_pair(tok, instance.prompt, instance.safe)]
    runs = [unit_mod.prepare(model, tok, 1, [instance], targets, True, 1000.0, 0, reply_off=off)
            for off in (False, True)]
    (plain_unit, plain, plain_terms), (held_unit, held, held_terms) = runs
    assert plain_unit.j == held_unit.j
    assert len(plain_terms[0].offs) == 1 and len(held_terms[0].offs) == 2
    assert held_terms[0].offs[1].shape[0] == len(targets[0].ids) - targets[0].n_prompt - 1
    assert not torch.equal(plain.change, held.change)  # (the probe saw the reply)


def test_unit_reply_on_fits_the_gate_on_over_the_responses_first_tokens(llama, instance):
    """`positives(reply_on=k)`: the last prompt token's row (as without, up to reduction order: another forward
    length, fp32 through two layers, 1e-5 as in `reply_inputs`' test) and the response's first k positions, never its
    last. An edit with `unit_reply_on=2` ends with the unit's gate higher at those two positions than the same edit
    without (same unit, same seed); it is refused with `unit_reply_off` and where no unit is trained."""
    from dinm.unit import positives, reply_inputs

    model, tok = llama
    encoded = [dinm.text.encode_pair(tok, instance.prompt, instance.safe),
               dinm.text.encode_pair(tok, "a short request", "No.")]
    plain = positives(model, 1, encoded)
    rows = positives(model, 1, encoded, reply_on=2)
    counts = [1 + min(2, len(e.ids) - e.n_prompt - 1) for e in encoded]
    assert rows.shape[0] == sum(counts) and counts[0] == 3
    assert torch.allclose(rows[[0, counts[0]]], plain, rtol=1e-5, atol=1e-5)
    config = EditConfig.unit(steps=3, layer=1, kl_reply_tokens=4, variants="none")
    without, held = (dinm.edit(model, tok, instance, config.replace(unit_reply_on=n)) for n in (0, 2))
    assert held.config.unit_reply_on == 2 and int(held.metadata["unit"]) == int(without.metadata["unit"])
    j, name = int(held.metadata["unit"]), "model.layers.1.mlp.gate_proj.weight"
    first = reply_inputs(model, 1, encoded[:1])[:2]
    stored = model.get_parameter(name)[j].detach().float()
    on = [(first @ (stored + d.dense(name)[j].float())).mean().item() for d in (without, held)]
    assert on[1] > on[0], on
    with pytest.raises(ConfigError, match="unit_reply_off"):
        EditConfig.unit(unit_reply_on=2, unit_reply_off=True)
    with pytest.raises(ConfigError, match="non-negative integer"):
        EditConfig.unit(unit_reply_on=-1)
    with pytest.raises(ConfigError, match="has no gate"):
        EditConfig(unit_reply_on=2).resolved(gated=False)
