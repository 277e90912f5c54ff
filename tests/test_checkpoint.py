"""Deltas on checkpoint folders on disk: single-file and sharded, into a new folder or in place, stacking, and
what a crash at every write step leaves behind."""

import os

import pytest
import torch

from dinm import EditConfig, atomic, checkpoint
from dinm.errors import DeltaError

from conftest import _llama, checkpoint_tensors as tensors, make_delta

FAST = EditConfig.dense(steps=2, lr=1e-2, layer=1)  # (make_delta's update is of the output matrix)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8))
                                        for k in a)


@pytest.fixture(params=["single", "sharded"])
def folder(request, tmp_path, tokenizer):
    model = _llama(len(tokenizer))
    path = tmp_path / "ckpt"
    model.save_pretrained(path, max_shard_size="30KB" if request.param == "sharded" else "1GB")
    tokenizer.save_pretrained(path)
    assert os.path.exists(path / checkpoint.INDEX) == (request.param == "sharded")
    return path


@pytest.fixture
def delta(folder):
    """A delta of the checkpoint's layer 1 (made without an edit: these tests are about the files)."""
    from transformers import AutoModelForCausalLM

    return make_delta(AutoModelForCausalLM.from_pretrained(folder), 1, config=FAST)


def test_round_trip_matches_delta_apply_and_revert_restores_every_byte(folder, delta, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    original = tensors(folder)
    edited_dir, restored_dir = tmp_path / "edited", tmp_path / "restored"
    rewritten = checkpoint.apply_to_folder(delta, str(folder), str(edited_dir))
    weight_map, _ = checkpoint.layout(str(folder))
    assert rewritten == [weight_map[delta.names[0]]]  # only the shard holding the tensor
    shards = set(weight_map.values())
    for entry in os.listdir(folder):  # unchanged weight shards are shared; everything else is a copy
        if entry not in rewritten and os.path.isfile(folder / entry):
            assert os.path.samefile(folder / entry, edited_dir / entry) == (entry in shards), entry

    on_disk = AutoModelForCausalLM.from_pretrained(edited_dir)
    in_memory = AutoModelForCausalLM.from_pretrained(folder)
    delta.apply(in_memory)
    ids = torch.tensor([tokenizer("hello there")["input_ids"]])
    assert torch.equal(on_disk(ids).logits, in_memory(ids).logits)

    checkpoint.apply_to_folder(delta, str(edited_dir), str(restored_dir), revert=True)
    assert same(tensors(restored_dir), original)
    assert same(tensors(folder), original)  # the source is never modified


def test_in_place_apply_then_revert(folder, delta):
    original = tensors(folder)
    weight_map, _ = checkpoint.layout(str(folder))
    untouched = {f: os.stat(folder / f).st_ino for f in set(weight_map.values()) if f != weight_map[delta.names[0]]}
    checkpoint.apply_to_folder(delta, str(folder))
    edited = tensors(folder)
    assert not same(edited, original) and [k for k in original if not torch.equal(original[k], edited[k])] == \
        delta.names
    assert {f: os.stat(folder / f).st_ino for f in untouched} == untouched  # other shards never rewritten
    with pytest.raises(DeltaError, match="already applied"):
        checkpoint.apply_to_folder(delta, str(folder))
    checkpoint.apply_to_folder(delta, str(folder), revert=True)
    assert same(tensors(folder), original)
    assert not [f for f in os.listdir(folder) if f.startswith(".")]  # no temp file left
    with pytest.raises(DeltaError, match="not applied"):
        checkpoint.apply_to_folder(delta, str(folder), revert=True)


STEPS = ["write", "fsync", "rename shard", "write index", "replace index", "remove old shard", "replace", "rename"]


@pytest.mark.parametrize("mode", ["in place", "new folder"])
@pytest.mark.parametrize("direction", ["apply", "revert"])
def test_a_crash_after_any_write_step_leaves_old_or_new(folder, delta, tmp_path, mode, direction, monkeypatch):
    if direction == "revert":
        checkpoint.apply_to_folder(delta, str(folder))
    old = tensors(folder)
    new_state = dict(old)
    name = delta.names[0]
    new_state[name] = old[name].clone()
    delta.update_tensor(name, new_state[name], revert=direction == "revert")
    crashes = 0
    for target in STEPS:
        out = None if mode == "in place" else str(tmp_path / f"out-{direction}-{target.replace(' ', '-')}")

        def crash(step, target=target):
            if step == target:
                raise KeyboardInterrupt(f"injected crash after {step}")

        monkeypatch.setattr(atomic, "_after_step", crash)
        try:
            checkpoint.apply_to_folder(delta, str(folder), out, revert=direction == "revert")
            happened = False
        except KeyboardInterrupt:
            happened = True
            crashes += 1
        monkeypatch.setattr(atomic, "_after_step", None)
        where = folder if out is None else tmp_path / os.path.basename(out)
        if out is not None and not os.path.exists(out):
            assert happened  # the new folder appears whole or not at all
            assert not [p for p in os.listdir(tmp_path) if p.startswith(".dinm-")]
            continue
        state = tensors(where)
        assert same(state, old) or same(state, new_state), (target, happened)
        if out is None and same(state, new_state):  # put the folder back for the next crash point
            checkpoint.apply_to_folder(delta, str(folder), revert=direction != "revert")
        assert same(tensors(folder), old)
    assert crashes >= 3  # the matrix did crash at several points of this layout


def test_stacked_deltas_revert_in_reverse_order_only(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    original = tensors(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    first = make_delta(model, 1, seed=0)
    first.apply(model)
    second = make_delta(model, 1, seed=1)  # made on the edited model, same tensor
    alone = make_delta(AutoModelForCausalLM.from_pretrained(folder), 1, seed=1)

    checkpoint.apply_to_folder(first, str(folder))
    with pytest.raises(DeltaError, match="changed it since"):
        checkpoint.apply_to_folder(alone, str(folder))  # made on the base, but the base has moved
    checkpoint.apply_to_folder(second, str(folder))
    with pytest.raises(DeltaError, match="revert .* first"):
        checkpoint.apply_to_folder(first, str(folder), revert=True)
    checkpoint.apply_to_folder(second, str(folder), revert=True)
    checkpoint.apply_to_folder(first, str(folder), revert=True)
    assert same(tensors(folder), original)


def test_bad_inputs_change_nothing(folder, delta, tmp_path, llama):
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    other = make_delta(llama[0].to(torch.float64), 1)  # wrong dtype for this checkpoint
    with pytest.raises(DeltaError, match="float64"):
        checkpoint.apply_to_folder(other, str(folder))
    stranger = _llama(len(llama[1]))
    with torch.no_grad():
        for p in stranger.parameters():
            p.mul_(1.5)  # same architecture, other weights
    foreign = make_delta(stranger, 1)
    with pytest.raises(DeltaError, match="differ from the base"):
        checkpoint.apply_to_folder(foreign, str(folder))
    with pytest.raises(DeltaError, match="not a folder"):
        checkpoint.apply_to_folder(delta, str(tmp_path / "missing"))
    with pytest.raises(DeltaError, match="exists"):
        checkpoint.apply_to_folder(delta, str(folder), str(folder))
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before


def test_pickle_checkpoints_are_refused_with_a_way_out(tmp_path, delta):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(DeltaError, match="pickle .*save_pretrained"):
        checkpoint.apply_to_folder(delta, str(tmp_path))
