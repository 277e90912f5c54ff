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


def test_every_table_entry_formats():
    for model_type, spec in ARCHITECTURES.items():
        assert spec.mlp_out.format(3).count("3") >= 1, model_type
