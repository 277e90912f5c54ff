import json
import os

import pytest
import torch
from safetensors.torch import save_file

import dinm
from dinm import Delta, EditConfig
from dinm.delta import fingerprint
from dinm.errors import DeltaError

from conftest import same_state, state

FAST = EditConfig(steps=3, lr=1e-2)


@pytest.fixture
def edited(tiny, instance):
    model, tok = tiny
    return model, dinm.edit(model, tok, instance, FAST)


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


def test_wrong_model_is_refused(edited, tokenizer, instance):
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
