"""What `dinm demo` prints about the edit (`dinm.demo.where`, `what`, `located`) for each kind of delta; the demo's
run itself loads the embedded model and is `make demo` (README, "Set-up: two commands")."""

import dinm
from dinm import EditConfig
from dinm.demo import located, what, where


def test_the_demo_describes_a_patch_of_two_units_by_its_units(llama, instance):
    """The default on a gated MLP is two units, each located on its own: the demo names both units and their layers
    and charts the first unit's distances (the instance's own locate), not the delta's empty top-level ones."""
    model, tok = llama
    delta = dinm.edit(model, tok, instance, EditConfig(steps=1))
    first, second = delta.units
    distances, layer = located(delta)
    assert distances == first["distances"] and len(distances) == 3 and layer == first["layer"]
    text = where(delta, "cosine_inner")
    assert text.startswith(f"located layer {first['layer']} (cosine_inner distance over 3 layers)")
    assert text.count("<- layer") == 1 and f"unit 2 (wrapped) located layer {second['layer']}" in text
    assert what(delta) == (f"2 units: unit {first['unit']} of layer {first['layer']} (request), unit "
                           f"{second['unit']} of layer {second['layer']} (wrapped) (each its gate row, up row and "
                           f"down column)")


def test_the_demo_describes_one_unit_and_a_dense_edit_as_before(llama, instance):
    model, tok = llama
    one = dinm.edit(model, tok, instance, EditConfig.unit(steps=1))
    assert what(one) == f"unit {one.metadata['unit']} of layer {one.layer} (its gate row, up row and down column)"
    assert located(one) == (one.distances, one.layer) and where(one, "cosine_inner").startswith(
        f"located layer {one.layer} ")
    given = dinm.edit(model, tok, instance, EditConfig.dense(steps=1, layer=1))
    assert what(given) == "model.layers.1.mlp.down_proj.weight" and where(given, "x") == "layer 1 (given, not located)"
