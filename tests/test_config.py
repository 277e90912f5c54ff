import json

import pytest

from dinm import EditConfig
from dinm.errors import ConfigError


def test_json_round_trip_is_sorted_and_exact():
    config = EditConfig(layer=3, steps=7, lr=1e-3, kl_weight=0.5, distance="l2", master_dtype="model")
    text = config.to_json()
    assert EditConfig.from_json(text) == config
    keys = [line.split('"')[1] for line in text.splitlines() if line.startswith('  "')]
    assert keys == sorted(keys)


def test_frozen():
    with pytest.raises(Exception):
        EditConfig().steps = 3


def test_unknown_field_suggests():
    with pytest.raises(ConfigError, match="no field 'stpes'.*Did you mean 'steps'"):
        EditConfig.from_dict({"stpes": 3})


@pytest.mark.parametrize("field, value", [("steps", 0), ("lr", 0.0), ("lr", float("nan")), ("kl_weight", -1.0),
                                          ("distance", "manhattan"), ("master_dtype", "float64"), ("layer", -1),
                                          ("compute_dtype", "float16"), ("preserve_weight", -1.0),
                                          ("unsafe_weight", -1.0), ("unsafe_weight", float("nan")),
                                          ("precondition", "adam"), ("matrix", "o_proj"),
                                          ("max_prompt_tokens", 2.5), ("variants", "all"), ("steps", 2.5),
                                          ("unit_per_instance", 1), ("unit_per_instance", True)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field if field != "distance" else "distance"):
        EditConfig(**{field: value})


def test_replace_validates():
    assert EditConfig().replace(steps=3).steps == 3
    with pytest.raises(ConfigError):
        EditConfig().replace(steps=-1)


def test_paper_preset():
    paper = EditConfig.paper()
    assert (paper.distance, paper.chat_template, paper.kl_weight, paper.steps, paper.lr) == ("paper", False, 0.0, 10, 5e-4)
    assert EditConfig.paper(steps=3).steps == 3
    assert (paper.kl_text, paper.preserve_weight) == ("answer", 0.0)  # the paper has neither
    assert EditConfig.from_json(paper.to_json()) == paper


def test_default_and_first_default():
    # the default chosen by the ablation (README, "Choosing the default edit"); v0 kept for comparison
    default, v0 = EditConfig(), EditConfig.v0()
    assert (default.distance, default.matrix, default.steps, default.lr, default.variants, default.kl_text,
            default.kl_weight, default.preserve_weight) == ("cosine_inner", "auto", None, None, None, "self", 10.0,
                                                            1000.0)
    assert (v0.distance, v0.matrix, v0.steps, v0.lr, v0.variants, v0.kl_text, v0.kl_weight, v0.preserve_weight
            ) == ("cosine", "down", 10, 5e-4, "none", "answer", 1.0, 0.0)


def test_the_default_resolves_to_two_units_on_a_gated_mlp_and_to_the_dense_edit_elsewhere():
    """matrix="auto" becomes two units (the request's and the wrappers', each fitted on over its replies' first 2
    tokens) where the MLP is gated and nothing asks for a matrix (rank, precondition), else the output projection;
    steps, lr, variants and unit_reply_on left unset take that kind's measured values, set ones are kept."""
    assert EditConfig().resolved(gated=True) == EditConfig.two_units()
    assert EditConfig.two_units() == EditConfig.unit(variants="request+wrapped", unit_reply_on=2)
    assert EditConfig.unit().unit_reply_on == 0 and EditConfig.unit().variants == "request"  # (one unit: as measured)
    assert EditConfig(matrix="unit").resolved(gated=True) == EditConfig.unit()  # (asked for one unit: that setting)
    assert EditConfig().resolved(gated=False) == EditConfig.dense()
    assert EditConfig.dense() == EditConfig(matrix="down", steps=50, lr=2e-3, variants="none", unit_reply_on=0)
    assert EditConfig(rank=4).resolved(gated=True) == EditConfig.dense(rank=4)
    assert EditConfig(precondition="keys").resolved(gated=True) == EditConfig.dense(precondition="keys")
    assert EditConfig(steps=7).resolved(gated=True) == EditConfig.two_units(steps=7)
    # (one unit asked for under "auto": without the fit over the reply, which was measured with two units only)
    assert EditConfig(variants="none").resolved(gated=True) == EditConfig.unit(variants="none")
    assert EditConfig(unit_reply_on=0).resolved(gated=True) == EditConfig.two_units(unit_reply_on=0)
    assert EditConfig(unit_reply_off=True).resolved(gated=True) == EditConfig.two_units(unit_reply_on=0,
                                                                                       unit_reply_off=True)
    assert EditConfig(matrix="gate").resolved(gated=True) == EditConfig.dense(matrix="gate")
    assert EditConfig(matrix="unit").resolved(gated=False).matrix == "unit"  # (refused by the edit, in one line)
    assert EditConfig().resolved(gated=True, instances=2) == EditConfig.dense()  # (a batch: the dense patch)
    assert EditConfig.unit().resolved(gated=True, instances=2) == EditConfig.unit()  # (asked for: kept)
    for config in (EditConfig.unit(), EditConfig.two_units(), EditConfig.dense(lr=1e-3), EditConfig.v0(),
                   EditConfig.paper()):
        assert config.resolved(gated=True) == config.resolved(gated=False) == config  # (nothing left to resolve)


@pytest.mark.parametrize("field, value, message", [
    ("kl_text", "mine", "kl_text must be one of"),
    ("stop_nll", 0, "stop_nll must be"),
    ("stop_nll", float("inf"), "stop_nll must be"),
    ("kl_reply_tokens", 0, "kl_reply_tokens must be"),
])
def test_new_fields_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=message):
        EditConfig(**{field: value})


def test_stop_nll_round_trips_through_json():
    config = EditConfig(stop_nll=0.5)
    assert EditConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("field, off, on, removed", [
    ("cache", True, False, "0.2"), ("rows", 1.0, 0.1, "0.2"), ("kl_prompts", [], ["Hi"], "0.2"),
    ("max_update", None, 0.02, "0.2"), ("protect", None, 0.99, "0.2"), ("probe", "trained", "wrapped", "0.3")])
def test_removed_fields_read_when_off_refused_when_on(field, off, on, removed):
    """A config written by an older dinm (in a delta, or a user's file) still reads when a removed setting was off,
    which is what every edit does now; one that turned it on is refused in one line, naming the field."""
    old = {**EditConfig.v0().to_dict(), field: off}
    assert EditConfig.from_dict(old) == EditConfig.v0()
    with pytest.raises(ConfigError, match=f"field '{field}' was removed in dinm {removed}") as e:
        EditConfig.from_json(json.dumps({**old, field: on}))
    assert "\n" not in str(e.value)
    assert field not in EditConfig().to_dict()


def test_precondition_trains_a_dense_update_only():
    with pytest.raises(ConfigError, match="precondition='keys' trains a dense update; it does not combine with rank=4"):
        EditConfig(precondition="keys", rank=4)
    with pytest.raises(ConfigError, match="master_dtype='model' does not apply"):
        EditConfig(precondition="keys", master_dtype="model")
