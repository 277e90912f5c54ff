"""`EditConfig(matrix="unit")` (`dinm.unit`): one MLP unit repurposed as a thresholded detector. What the edit
computes through its hook is what its delta writes into the weights; only that unit changes; its gate probe and
its hinge do what they say; where the MLP has no gate it is refused in one line."""

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


def test_the_default_edit_is_the_unit_setting_on_a_gated_mlp_and_the_dense_one_elsewhere(tokenizer, instance):
    """EditConfig() edits one unit of a Llama (gated MLP) with the unit's steps and lr, and the output projection of
    a GPT-2 with the dense edit's; each delta stores the config it ran, not "auto"."""
    llama, gpt2 = _llama(len(tokenizer)), _gpt2(len(tokenizer))
    unit_delta = dinm.edit(llama, tokenizer, instance, EditConfig(layer=1, steps=1))
    assert "unit" in unit_delta.metadata and len(unit_delta.names) == 3
    assert unit_delta.config == EditConfig.unit(layer=1, steps=1)
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
