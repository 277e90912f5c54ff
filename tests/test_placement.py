"""Models spread by accelerate (`device_map`): layers offloaded to disk or to CPU memory, on a CPU-only machine.

An offloaded layer's parameters sit on the "meta" device and its hook loads the values before each forward;
edit must read them there, and a delta must go where the hook loads from (or be refused, model untouched).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

import dinm
from dinm import EditConfig
from dinm.errors import DeltaError
from dinm.placement import stored

from conftest import make_delta

CONFIG = EditConfig(steps=3, lr=1e-2)
IDS = torch.tensor([[5, 6, 7, 8, 9]])


@pytest.fixture
def plain(tiny_folder):
    return AutoModelForCausalLM.from_pretrained(tiny_folder).eval()


@pytest.fixture
def on_disk(tiny_folder, tmp_path):
    """Embeddings and layers 1-2 offloaded to disk; layer 0, the final norm and the head in memory."""
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, device_map=device_map, offload_folder=str(tmp_path))
    assert model.model.layers[2].mlp.down_proj.weight.device.type == "meta"
    return model.eval()


@pytest.fixture
def cpu_offloaded(tiny_folder):
    from accelerate import cpu_offload

    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    return model


def same_edit(a, b):
    name = a.names[0]
    return a.layer == b.layer and [h.nll for h in a.history] == [h.nll for h in b.history] and torch.equal(
        a.tensors[name], b.tensors[name])


@pytest.mark.parametrize("changes", [{}, {"layer": 0}, {"layer": 2}, {"layer": 1, "compute_dtype": "bfloat16"}])
def test_edit_on_disk_offloaded_model_equals_in_memory(on_disk, plain, tokenizer, instance, changes):
    config = CONFIG.replace(**changes)
    assert same_edit(dinm.edit(on_disk, tokenizer, instance, config), dinm.edit(plain, tokenizer, instance, config))


def test_delta_on_disk_offloaded_layer_is_refused_and_nothing_changes(on_disk):
    delta = make_delta(on_disk, 2)  # made from the values accelerate holds for the offloaded layer
    name = delta.names[0]
    before = stored(on_disk, name).clone()
    with pytest.raises(DeltaError, match=f"{name}.*offloaded to disk.*dinm apply"):
        delta.apply(on_disk)
    assert torch.equal(stored(on_disk, name), before)


def test_cpu_offloaded_model_edit_apply_revert(cpu_offloaded, plain, tokenizer, instance):
    config = CONFIG.replace(layer=1)
    delta = dinm.edit(cpu_offloaded, tokenizer, instance, config)
    assert same_edit(delta, dinm.edit(plain, tokenizer, instance, config))
    with torch.no_grad():
        before = cpu_offloaded(IDS).logits
        delta.apply(cpu_offloaded)
        after = cpu_offloaded(IDS).logits
        delta.apply(plain)
        expected = plain(IDS).logits
        delta.revert(cpu_offloaded)
        back = cpu_offloaded(IDS).logits
    assert not torch.equal(before, after) and torch.equal(after, expected) and torch.equal(back, before)


def test_evaluate_with_delta_on_cpu_offloaded_model(cpu_offloaded, plain, tokenizer, instance):
    """The offloaded model answers, before and after the delta, exactly as the same model in memory does; the delta
    (large enough to change replies) is reverted afterwards."""
    delta = make_delta(cpu_offloaded, 1, scale=3.0)
    name = delta.names[0]
    base = stored(cpu_offloaded, name).clone()
    kwargs = dict(delta=delta, max_new_tokens=6, progress=False)
    report = dinm.evaluate(cpu_offloaded, tokenizer, [instance], **kwargs)
    expected = dinm.evaluate(plain, tokenizer, [instance], **kwargs)

    def replies(r, state):
        return {k: v["reply"] for k, v in r["records"][0][state].items() if isinstance(v, dict) and "reply" in v}

    assert len(replies(report, "after")) >= 6  # DS, 4 DG, benign
    assert replies(report, "before") == replies(expected, "before")
    assert replies(report, "after") == replies(expected, "after") != replies(report, "before")
    assert torch.equal(stored(cpu_offloaded, name), base)  # reverted after the evaluation


def test_key_statistic_reads_offloaded_weights_and_sees_a_delta_applied_below(cpu_offloaded, on_disk, plain,
                                                                             tokenizer):
    """The key statistic's cache key covers offloaded weights (read where their hook loads them from): a delta
    applied in place to a CPU-offloaded layer below the edited one makes it compute the statistic again, equal to
    the in-memory model's with the same delta; a disk-offloaded model's key is the in-memory model's, so a changed
    checkpoint loaded with disk offload misses the disk cache rather than reading a stale file."""
    from dinm import keys

    assert keys._weight_sums(on_disk, 2) == keys._weight_sums(plain, 2)
    first = keys.key_moment(cpu_offloaded, tokenizer, 2)
    delta = make_delta(cpu_offloaded, 1, scale=0.5)
    with delta.applied(cpu_offloaded):
        again = keys.key_moment(cpu_offloaded, tokenizer, 2)
        with delta.applied(plain):
            assert keys._weight_sums(cpu_offloaded, 2) == keys._weight_sums(plain, 2)
            expected = keys.key_moment(plain, tokenizer, 2)
    assert not torch.equal(again, first)
    assert torch.equal(again, expected)
    assert torch.equal(keys.key_moment(cpu_offloaded, tokenizer, 2), first)  # reverted: the first weights again


def test_load_model_and_cli_with_device_map(tiny_folder, tmp_path):
    """`load_model(device_map=...)` goes through accelerate (offloading to a folder of its own when none is
    given), and `dinm edit --device-map auto` runs (here everything fits the CPU)."""
    from click.testing import CliRunner

    from dinm_cli import main

    from conftest import DATA

    model, tok = dinm.load_model(tiny_folder, device_map={"model.embed_tokens": "cpu", "model.layers": "disk",
                                                          "model.norm": "cpu", "model.rotary_emb": "cpu",
                                                          "lm_head": "cpu"})
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    out = tmp_path / "d.safetensors"
    result = CliRunner().invoke(main, ["edit", tiny_folder, "--instance", f"{DATA}/example.json", "-o", str(out),
                                       "--steps", "2", "--device-map", "auto"])
    assert result.exit_code == 0, result.output
    assert dinm.Delta.load(str(out)).layer is not None
