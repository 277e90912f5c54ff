import pytest
import torch

from dinm.arch import ARCHITECTURES, arch_spec, as_out_in, mlp_out_name, num_layers
from dinm.errors import ArchitectureError, DinmError


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox"])
def test_required_architectures_are_in_the_table(model_type):
    spec = arch_spec(model_type)
    assert "{}" in spec.mlp_out and spec.layers and spec.final_norm and spec.lm_head


def test_unknown_architecture_is_one_line_listing_supported():
    with pytest.raises(ArchitectureError) as e:
        arch_spec("lama")
    message = str(e.value)
    assert "\n" not in message and "'lama'" in message and "llama" in message and "gpt_neox" in message
    assert "Did you mean 'llama'" in message
    assert isinstance(e.value, DinmError) and isinstance(e.value, KeyError)


def test_names_resolve_on_tiny_models(tiny):
    model, _ = tiny
    spec = arch_spec(model)
    n = num_layers(model)
    assert n == 3
    for i in range(n):
        assert model.get_parameter(mlp_out_name(model, i)).dim() == 2
    model.get_submodule(spec.final_norm)
    model.get_submodule(spec.lm_head)
    with pytest.raises(ArchitectureError, match="out of range"):
        mlp_out_name(model, n)


def test_conv1d_is_viewed_as_out_in(tiny):
    model, _ = tiny
    spec = arch_spec(model)
    w = model.get_parameter(mlp_out_name(model, 0))
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    assert as_out_in(spec, w).shape[0] == hidden  # output features first, whatever the storage
    assert spec.conv1d == (model.config.model_type == "gpt2")


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_input_matrices_resolve_or_are_refused_in_one_line(model_type, tokenizer):
    """Every MLP matrix the table names is a 2-D parameter of a real (tiny) model of that type, with the MLP's
    input width on its input side (gate, up) or output side (down); one it lacks is refused naming what it has."""
    from dinm.arch import matrix_module, matrix_name, mlp_module

    model = _tiny_model(model_type, tokenizer)
    spec = arch_spec(model)
    named = {"down": spec.mlp_out, "gate": spec.mlp_gate, "up": spec.mlp_up}
    hidden = model.get_input_embeddings().weight.shape[1]
    for matrix, template in named.items():
        if template is None:
            with pytest.raises(ArchitectureError) as e:
                matrix_name(model, 1, matrix)
            assert "\n" not in str(e.value) and repr(matrix) in str(e.value) and "'down'" in str(e.value)
            continue
        out, inp = as_out_in(spec, model.get_parameter(matrix_name(model, 1, matrix))).shape
        assert (out if matrix == "down" else inp) == hidden
        module = matrix_module(model, 1, matrix)
        assert any(m is module for m in mlp_module(model, 1).modules())  # inside the layer's MLP block
    assert spec.mlp_up is not None or model_type == "phi3"  # (Phi-3 fuses gate and up: gate_up_proj)
    with pytest.raises(ArchitectureError, match="out of range"):
        matrix_name(model, 3, "up" if spec.mlp_up else "down")


def test_every_table_entry_formats():
    for model_type, spec in ARCHITECTURES.items():
        assert spec.mlp_out.format(3).count("3") >= 1, model_type


# Tiny sizes per config class: the field names differ between architectures.
_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, max_position_embeddings=512)
_TINY_BY_TYPE = {
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=512),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     max_position_embeddings=512),
}


def _tiny_model(model_type: str, tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    special = {k: tokenizer.eos_token_id for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **special,
                                  **_TINY_BY_TYPE.get(model_type, _TINY))
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_edits_on_a_tiny_model_of_its_type(model_type, tokenizer, instance):
    """Each entry of the table resolved against a real (tiny, random) model of that type: locate, a two-step default
    edit (two units where the MLP is gated, else the output projection) with the default regularisers, apply (the
    outputs move), revert (every bit back)."""
    import dinm
    from dinm import EditConfig
    from dinm.unit import supported

    from conftest import same_state, state

    model = _tiny_model(model_type, tokenizer)
    assert model.config.model_type == model_type
    before = state(model)
    delta = dinm.edit(model, tokenizer, instance, EditConfig(steps=2, lr=1e-2))
    if supported(model):  # (two units, each located: its layer's three matrices)
        assert delta.config.matrix == "unit" and len(delta.units) == 2
        assert len(delta.names) == 3 * len({u["layer"] for u in delta.units})
        assert all(mlp_out_name(model, u["layer"]) in delta.names for u in delta.units)
        assert all(len(u["distances"]) == num_layers(model) == 3 for u in delta.units)
    else:
        assert delta.config.matrix == "down" and delta.names == [mlp_out_name(model, delta.layer)]
        assert len(delta.distances) == num_layers(model) == 3
    assert delta.history[-1].kl is not None and delta.history[-1].moved is not None
    assert same_state(model, before)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        unedited = model(input_ids=ids).logits
        with delta.applied(model):
            edited = model(input_ids=ids).logits
    assert not torch.equal(unedited, edited)
    assert same_state(model, before)
