import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dinm import Delta, EditConfig
from dinm.delta import fingerprint, header_checksum
from dinm.errors import ConfigError, DeltaError

from conftest import make_delta, same_state, state

FAST = EditConfig.dense(steps=3, lr=1e-2)  # (make_delta's update is of the output matrix)


@pytest.fixture
def edited(tiny):
    """A model and a delta of its layer 1 (with an edit's metadata; what edit computes is tested in test_edit)."""
    model, _ = tiny
    return model, make_delta(model, 1, config=FAST)


def test_apply_changes_only_the_edited_tensor_and_revert_is_bit_exact(edited):
    model, delta = edited
    before = state(model)
    name = delta.names[0]
    delta.apply(model)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [name]
    assert torch.equal(after[name], before[name] + delta.tensors[name])
    delta.revert(model)
    assert same_state(model, before)


def test_config_of_an_older_delta_reads_as_that_edit_ran(edited):
    """A delta made before `preserve_weight` / `kl_text` existed ran without the penalty, on the answer."""
    _, delta = edited
    old = {k: v for k, v in json.loads(delta.metadata["config"]).items() if k not in ("preserve_weight", "kl_text")}
    older = Delta(delta.tensors, {**delta.metadata, "config": json.dumps(old)})
    assert (older.config.preserve_weight, older.config.kl_text) == (0.0, "answer")
    assert older.config.replace(preserve_weight=FAST.preserve_weight, kl_text=FAST.kl_text) == FAST
    # Before `matrix` and `variants` existed every edit was a dense one of the output matrix, on the attack alone
    # (today's default for those fields, "auto" and None, would read as another edit).
    dense = {k: v for k, v in json.loads(delta.metadata["config"]).items() if k not in ("matrix", "variants")}
    before_unit = Delta(delta.tensors, {**delta.metadata, "config": json.dumps(dense)})
    assert (before_unit.config.matrix, before_unit.config.variants) == ("down", "none")
    assert before_unit.config == FAST
    # Before `unit_reply_on` existed no unit was fitted on along its reply (today's None would read as unset).
    unfitted = {k: v for k, v in json.loads(delta.metadata["config"]).items() if k != "unit_reply_on"}
    before_fit = Delta(delta.tensors, {**delta.metadata, "config": json.dumps(unfitted)})
    assert before_fit.config.unit_reply_on == 0 and before_fit.config == FAST


def test_a_delta_written_by_dinm_0_1_reads(edited):
    """0.1 wrote every field of its config, the removed ones too (`cache`, `rows`, ...); with them off (what every
    edit does now) the config reads as today's; a delta whose edit turned one on still applies, and its config
    says in one line which field it used."""
    model, delta = edited
    written = {**json.loads(delta.metadata["config"]), "cache": True, "rows": 1.0, "kl_prompts": [],
               "max_update": None, "protect": None}
    old = Delta(delta.tensors, {**delta.metadata, "config": json.dumps(written), "dinm_version": "0.1.0"})
    assert old.config == FAST
    protected = Delta(delta.tensors, {**delta.metadata, "config": json.dumps({**written, "protect": 0.99})})
    with pytest.raises(ConfigError, match="field 'protect' was removed"):
        protected.config
    with protected.applied(model):
        pass


def test_history_is_typed_and_round_trips(edited, tmp_path):
    from dinm import Step

    _, delta = edited
    steps = delta.history
    assert steps and all(isinstance(s, Step) for s in steps)
    assert [s.to_dict() for s in steps] == json.loads(delta.metadata["history"])
    assert steps[1] == Step(step=1, nll=1.9, kl=0.01, loss=1.91)
    assert Step.from_dict({"step": 3, "nll": 0.5, "stopped": True, "from_a_newer_dinm": 1}) == Step(3, 0.5,
                                                                                                  stopped=True)
    assert Step(3, 0.5, stopped=True).to_dict() == {"step": 3, "nll": 0.5, "stopped": True}
    for bad in ([{"nll": 1.0}], [{"step": 0}], [{"step": "0", "nll": 1.0}], [[0, 1.0]],
                [{"step": 0, "nll": 1.0, "kl": "x"}], [{"step": 0, "nll": 1.0, "stopped": "yes"}],
                [{"step": 0, "nll": 10 ** 400}], [{"step": 0, "nll": True}]):
        metadata = {**delta.metadata, "history": json.dumps(bad)}
        metadata["checksum"] = header_checksum(metadata)  # intact as a file: the history itself is malformed
        save_file(delta.tensors, tmp_path / "h.safetensors", metadata=metadata)
        with pytest.raises(DeltaError, match="'history' must be a list of steps"):
            Delta.load(tmp_path / "h.safetensors")


def test_a_patch_of_units_metadata_is_checked(edited, tmp_path):
    """A patch of units' "units" and "layers" (`dinm.editing._unit_patch`) read back as written; a file that still
    checksums but holds malformed ones is refused in one line naming the field (what `dinm inspect` would print)."""
    _, delta = edited
    unit = {"instance_id": "a", "layer": 1, "unit": 5, "steps_run": 3, "nll_first": 2.0, "nll_last": 0.5,
            "distances": [0.1, 0.2, 0.3]}
    good = {k: v for k, v in delta.metadata.items() if k != "layer"}
    good.update(units=json.dumps([unit, {**unit, "layer": 2, "instance_id": "b"}]), layers="[1, 2]")
    path = tmp_path / "p.safetensors"
    for units, layers, field in (
            ([unit], [1], None), ([unit], [1, 2], "'units'"), ([unit], [10 ** 300], "'layers'"),
            ([unit], ["1"], "'layers'"), ([{**unit, "layer": 10 ** 7}], [10 ** 7], "'layers'"),
            ([{**unit, "unit": -1}], [1], "'units'"), ([{**unit, "nll_first": 10 ** 400}], [1], "'units'"),
            ([{**unit, "steps_run": True}], [1], "'units'"), ([{**unit, "distances": ["x"]}], [1], "'units'"),
            ([{k: v for k, v in unit.items() if k != "instance_id"}], [1], "'units'"), (["u"], [1], "'units'"),
            ([unit], None, "'layers'"), (None, [1], "'layers'"),
            ([unit, {**unit, "instance_id": "b"}], [1], "'units'")):  # (the same unit twice)
        metadata = {k: v for k, v in good.items() if k not in ("units", "layers", "checksum")}
        metadata.update({k: json.dumps(v) for k, v in (("units", units), ("layers", layers)) if v is not None})
        metadata["checksum"] = header_checksum(metadata)
        save_file(delta.tensors, path, metadata=metadata)
        if field is None:
            loaded = Delta.load(path)
            assert loaded.units == units and loaded.layers == layers and loaded.layer is None
            continue
        with pytest.raises(DeltaError, match=field):
            Delta.load(path)
    metadata = {**good, "units": json.dumps([unit]), "layers": "[1]", "layer": "2"}  # "layer" contradicts "layers"
    metadata.pop("checksum")
    metadata["checksum"] = header_checksum(metadata)
    save_file(delta.tensors, path, metadata=metadata)
    with pytest.raises(DeltaError, match="'layers'"):
        Delta.load(path)
    metadata = {**good, "units": json.dumps([unit]), "layers": "[1]", "unit": "5"}  # one unit's 'unit' beside it
    metadata.pop("checksum")
    metadata["checksum"] = header_checksum(metadata)
    save_file(delta.tensors, path, metadata=metadata)
    with pytest.raises(DeltaError, match="'units'"):
        Delta.load(path)
    assert delta.units == [] and delta.layers == [delta.layer]  # (a delta of one edit)


def test_applied_reverts_on_exit_even_on_error(edited):
    model, delta = edited
    before = state(model)
    name = delta.names[0]
    with delta.applied(model) as same:
        assert same is model and torch.equal(model.get_parameter(name), before[name] + delta.tensors[name])
    assert same_state(model, before)
    with pytest.raises(KeyError):
        with delta.applied(model):
            raise KeyError("boom")
    assert same_state(model, before)
    with torch.no_grad():  # weights that are not the delta's base, with force: the same weights back, every bit
        model.get_parameter(name).mul_(1.37)
    other = state(model)
    with delta.applied(model, force=True):
        assert not same_state(model, other)
    assert same_state(model, other)
    with torch.no_grad():
        model.get_parameter(name).copy_(before[name])
    delta.apply(model)  # a model that already holds the edit: refused, nothing changed, nothing reverted
    with pytest.raises(DeltaError, match="refusing to apply"):
        with delta.applied(model):
            pass
    delta.revert(model)
    assert same_state(model, before)


def test_apply_delta_to_a_loaded_model_in_memory_and_saved(edited, tmp_path, monkeypatch):
    """`dinm.apply_delta` on a loaded model: in memory without `output`; with one, saved whole (a loadable
    checkpoint of the edited weights), the model then holding the edit; a failed save writes nothing and gives the
    model back as it was."""
    from transformers import AutoModelForCausalLM

    from dinm import apply_delta

    model, delta = edited
    before = state(model)
    name = delta.names[0]
    assert apply_delta(delta, model) == []
    assert torch.equal(model.get_parameter(name), before[name] + delta.tensors[name])
    assert apply_delta(delta, model, revert=True) == [] and same_state(model, before)
    out = tmp_path / "edited"
    assert apply_delta(delta, model, out) == [str(out)]
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(saved.get_parameter(name), before[name] + delta.tensors[name])
    delta.revert(model)
    with pytest.raises(DeltaError, match="exists"):
        apply_delta(delta, model, out)
    assert same_state(model, before)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", full_disk)
    with pytest.raises(DeltaError, match="No space left on device.*nothing was written"):
        apply_delta(delta, model, tmp_path / "other")
    assert same_state(model, before) and sorted(p.name for p in tmp_path.iterdir()) == ["edited"]
    with torch.no_grad():  # with force on weights that are not the base: given back as they were, every bit
        model.get_parameter(name).mul_(1.37)
    other = state(model)
    with pytest.raises(DeltaError, match="nothing was written"):
        apply_delta(delta, model, tmp_path / "other", force=True)
    assert same_state(model, other)


def test_save_load_round_trip(edited, tmp_path):
    model, delta = edited
    path = tmp_path / "d.safetensors"
    delta.save(path)
    loaded = Delta.load(path)
    assert loaded.metadata == delta.metadata
    assert loaded.tensors.keys() == delta.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], delta.tensors[k]) for k in delta.tensors)
    assert loaded.config == FAST and loaded.layer == delta.layer and loaded.distances == delta.distances
    meta = loaded.metadata
    for key in ("format", "dinm_version", "base_model", "base_revision", "model_type", "layer", "config",
                "distances", "tensors"):
        assert key in meta, key
    desc = json.loads(meta["tensors"])[delta.names[0]]
    assert desc["base_sha256"] == fingerprint(model.get_parameter(delta.names[0]))
    # only the edited tensor is stored: the file is about the size of one matrix
    assert os.path.getsize(path) < 1.2 * delta.nbytes + 8192
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]  # no temp file left behind
    before = state(model)
    loaded.apply(model)
    loaded.revert(model)
    assert same_state(model, before)


def test_fingerprint_mismatch_is_refused_and_changes_nothing(edited):
    model, delta = edited
    with torch.no_grad():
        model.get_parameter(delta.names[0])[0, 0] += 1.0
    before = state(model)
    with pytest.raises(DeltaError, match="refusing to apply.*does not match.*force"):
        delta.apply(model)
    assert same_state(model, before)
    delta.apply(model, force=True)
    assert not same_state(model, before)


def test_double_apply_and_revert_without_apply_are_refused(edited):
    model, delta = edited
    with pytest.raises(DeltaError, match="the delta is not applied"):
        delta.revert(model)
    delta.apply(model)
    with pytest.raises(DeltaError, match="already applied"):
        delta.apply(model)


def test_exactness_fixups_restore_every_bit():
    """Where (w + d) - d != w in floating point, the stored fixups make revert exact anyway."""
    torch.manual_seed(0)
    base = torch.randn(64, 32) * 1e-6
    edited = base + torch.randn(64, 32)
    delta = Delta.from_weights({"w": (base, edited)}, {"model_type": "llama"})
    assert delta.summary()["tensors"]["w"]["exactness_fixups"] > 0
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(base.clone())
    delta.apply(model)
    assert not torch.equal(model.w, base)
    delta.revert(model)
    assert torch.equal(model.w.view(torch.int32), base.view(torch.int32))


def test_wrong_model_is_refused(edited, tokenizer):
    model, delta = edited
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(DeltaError):
        delta.apply(other)


@pytest.mark.parametrize("corrupt", ["garbage", "truncate", "nan", "no_format", "shape_lie", "extra_tensor"])
def test_bad_files_are_refused(edited, tmp_path, corrupt):
    _, delta = edited
    path = tmp_path / "bad.safetensors"
    name = delta.names[0]
    meta = dict(delta.metadata)
    tensors = {k: v.clone() for k, v in delta.tensors.items()}
    if corrupt == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif corrupt == "truncate":
        delta.save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        if corrupt == "nan":
            tensors[name].view(-1)[0] = float("nan")
        elif corrupt == "no_format":
            del meta["format"]
        elif corrupt == "shape_lie":
            desc = json.loads(meta["tensors"])
            desc[name]["shape"] = [1, 1]
            meta["tensors"] = json.dumps(desc)
        elif corrupt == "extra_tensor":
            tensors["model.embed_tokens.weight"] = torch.zeros(2, 2)
        save_file(tensors, str(path), metadata=meta)
    with pytest.raises(DeltaError) as e:
        Delta.load(path)
    assert "\n" not in str(e.value) and "bad.safetensors" in str(e.value)


def test_save_into_missing_folder(edited, tmp_path):
    _, delta = edited
    with pytest.raises(DeltaError, match="does not exist"):
        delta.save(tmp_path / "nope" / "d.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_form_for_row_restricted_updates(llama, tmp_path, dtype):
    """An update touching few rows is stored as those rows plus a row mask, and round-trips bit for bit."""
    model, _ = llama
    model.to(dtype)
    name = "model.layers.1.mlp.down_proj.weight"
    base = model.get_parameter(name).detach().clone()
    base.view(-1)[1] = -0.0  # an untouched -0.0 must stay -0.0
    with torch.no_grad():
        model.get_parameter(name).copy_(base)
    edited = base.clone()
    edited[[3, 17]] += torch.randn(2, base.shape[1]).to(dtype) * 1e-2
    delta = Delta.from_weights({name: (base, edited)}, {"layer": 1})
    assert delta.described[name]["form"] == "rows" and delta.tensors[name].shape == (2, base.shape[1])
    dense = delta.dense(name)
    assert torch.equal(dense[[3, 17]], (edited - base)[[3, 17]]) and not dense[[0, 1, 2, 4]].any()
    assert delta.nbytes < 0.2 * base.numel() * base.element_size()
    path = tmp_path / "d.safetensors"
    delta.save(path)
    loaded = Delta.load(path)
    summary = loaded.summary()["tensors"][name]
    assert summary["form"] == "rows" and summary["rows_changed"] == 2
    before = state(model)
    loaded.apply(model)
    param = model.get_parameter(name)
    assert fingerprint(param) == delta.described[name]["edited_sha256"]
    untouched = torch.ones(base.shape[0], dtype=torch.bool)
    untouched[[3, 17]] = False
    assert torch.equal(param[untouched].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       base[untouched].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    loaded.revert(model)
    assert same_state(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_form_for_one_units_column(llama, tmp_path, dtype):
    """An update of a few columns (one unit's column of the output matrix) is stored as those columns plus a
    column mask: a few KB instead of the matrix, applied and reverted bit for bit, other elements untouched."""
    model, _ = llama
    model.to(dtype)
    name = "model.layers.1.mlp.down_proj.weight"
    base = model.get_parameter(name).detach().clone()
    base[0, 0] = -0.0  # an untouched -0.0 must stay -0.0
    with torch.no_grad():
        model.get_parameter(name).copy_(base)
    edited = base.clone()
    edited[:, 5] += torch.randn(base.shape[0]).to(dtype)
    delta = Delta.from_weights({name: (base, edited)}, {"layer": 1})
    assert delta.form(name) == "columns" and delta.tensors[name].shape == (base.shape[0], 1)
    assert torch.equal(delta.dense(name), edited - base)
    fixups = delta.tensors.get(name + ":revert_index", torch.empty(0, dtype=torch.int64))
    assert bool((fixups % base.shape[1] == 5).all())  # (elements a revert restores by value: in that column only)
    assert delta.nbytes == (base.shape[0] * base.element_size() + base.shape[1]
                            + fixups.numel() * (fixups.element_size() + base.element_size()))
    path = tmp_path / "d.safetensors"
    delta.save(path)
    loaded = Delta.load(path)
    assert loaded.metadata["format"] == "dinm.delta.v4"
    summary = loaded.summary()["tensors"][name]
    assert summary["form"] == "columns" and summary["columns_changed"] == 1
    before = state(model)
    loaded.apply(model)
    param = model.get_parameter(name).detach()
    assert fingerprint(param) == delta.described[name]["edited_sha256"]
    ints = torch.int16 if dtype == torch.bfloat16 else torch.int32
    keep = torch.ones(base.shape[1], dtype=torch.bool)
    keep[5] = False
    assert torch.equal(param[:, keep].contiguous().view(ints), base[:, keep].contiguous().view(ints))
    assert torch.equal(param[:, 5], (base[:, 5] + (edited - base)[:, 5]))
    loaded.revert(model)
    assert same_state(model, before)


def test_malformed_or_mismatched_column_mask_is_refused(llama, tmp_path):
    """A column mask of the wrong length, dtype or count, a column mask beside a row-form update, and a
    column form in a v3 file (which could not hold one) are refused in one line naming the file."""
    from dinm.delta import _digest

    model, _ = llama
    name = "model.layers.1.mlp.down_proj.weight"
    base = model.get_parameter(name).detach().clone()
    edited = base.clone()
    edited[:, 2] += 1.0
    delta = Delta.from_weights({name: (base, edited)}, {})
    assert delta.form(name) == "columns"
    path = tmp_path / "bad.safetensors"
    for cols in (torch.ones(3, dtype=torch.bool), torch.zeros(base.shape[1], dtype=torch.bool),
                 torch.ones(base.shape[1], dtype=torch.int64)):
        save_file({**delta.tensors, name + ":columns": cols}, str(path), metadata=delta.metadata)
        with pytest.raises(DeltaError, match="bad.safetensors") as e:
            Delta.load(path)
        assert "\n" not in str(e.value)
    edited_row = base.clone()
    edited_row[0] += 1.0
    rows = Delta.from_weights({name: (base, edited_row)}, {})
    assert rows.form(name) == "rows"
    save_file({**rows.tensors, name + ":columns": delta.tensors[name + ":columns"]}, str(path), metadata=rows.metadata)
    with pytest.raises(DeltaError, match="column mask"):
        Delta.load(path)
    described = delta.described
    described[name]["delta_sha256"] = _digest(delta.tensors, name)
    metadata = {**delta.metadata, "format": "dinm.delta.v3", "tensors": json.dumps(described, sort_keys=True)}
    metadata.pop("checksum")
    metadata["checksum"] = header_checksum(metadata)
    save_file(delta.tensors, str(path), metadata=metadata)
    with pytest.raises(DeltaError, match="its form 'columns' is not one a dinm.delta.v3 file holds"):
        Delta.load(path)


def test_dense_updates_stay_dense_and_tolerance_drops_small_rows(llama):
    model, _ = llama
    name = "model.layers.0.mlp.down_proj.weight"
    base = model.get_parameter(name).detach().clone()
    edited = base + 1e-3
    assert Delta.from_weights({name: (base, edited)}, {}).described[name]["form"] == "dense"
    edited[5] += 1.0
    delta = Delta.from_weights({name: (base, edited)}, {}, tolerance=0.5)
    assert delta.described[name]["form"] == "rows" and delta.tensors[name].shape[0] == 1
    applied = base.clone()
    applied[5] += (edited - base)[5]  # what applying really gives; the fingerprint says so
    assert delta.described[name]["edited_sha256"] == fingerprint(applied)


def test_malformed_row_mask_is_refused(llama, tmp_path):
    model, _ = llama
    name = "model.layers.1.mlp.down_proj.weight"
    base = model.get_parameter(name).detach().clone()
    edited = base.clone()
    edited[0] += 1.0
    delta = Delta.from_weights({name: (base, edited)}, {})
    for rows in (torch.ones(3, dtype=torch.bool), torch.zeros(base.shape[0], dtype=torch.bool),
                 torch.ones(base.shape[0], dtype=torch.int64)):
        path = tmp_path / "bad.safetensors"
        save_file({**delta.tensors, name + ":rows": rows}, str(path), metadata=delta.metadata)
        with pytest.raises(DeltaError, match="bad.safetensors"):
            Delta.load(path)
