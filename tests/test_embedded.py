"""Integration: a real edit on the embedded SmolLM2-135M-Instruct (what only a trained model shows). The model is
conftest's session-wide `smol`: every test here leaves it as it found it."""

import os

import torch

import dinm
from dinm.delta import fingerprint
from dinm.generate import generate
from dinm.judge import is_refusal

from conftest import DATA, same_state, state


def test_default_edit_refuses_the_attack_and_leaves_benign_replies_alone(smol):
    """The regression test of the default edit, on a record written for dinm: the edited model refuses the attack
    and gives the same greedy reply as before to at least 9 of 10 benign prompts (the first ten of
    data/benign.json, which no edit reads)."""
    from dinm.evaluation import load_benign

    model, tok = smol
    instance = dinm.load_instance(os.path.join(DATA, "example.json"))
    benign = [b.prompt for b in load_benign(os.path.join(DATA, "benign.json"))[:10]]
    prompts = [instance.prompt, instance.benign_prompt] + benign
    before_replies = generate(model, tok, prompts, max_new_tokens=40)
    assert not is_refusal(before_replies[0]), before_replies[0]  # the unedited model complies

    before = state(model)
    delta = dinm.edit(model, tok, instance)
    assert same_state(model, before)  # edit() is pure
    assert delta.names == [f"model.layers.{delta.layer}.mlp.down_proj.weight"]
    assert len(delta.distances) == 30

    with delta.applied(model):
        after_replies = generate(model, tok, prompts, max_new_tokens=40)
    assert is_refusal(after_replies[0]), after_replies[0]
    assert not is_refusal(after_replies[1]) and "100" in after_replies[1], after_replies[1]
    changed = [(p, b, a) for p, b, a in zip(benign, before_replies[2:], after_replies[2:]) if a != b]
    assert len(changed) <= 1, changed
    assert same_state(model, before)  # revert is bit-exact
    assert fingerprint(model.get_parameter(delta.names[0])) == delta.described[delta.names[0]]["base_sha256"]


def test_request_variant_refuses_the_bare_question_too(smol):
    """`variants="request"` on a record written for dinm: the edited model refuses the attack and the request alone
    (which the default edit still answers, the issue-19 gap), and at least 9 of 10 benign replies stay as they
    were."""
    from dinm.evaluation import load_benign
    from dinm.instance import request_of

    model, tok = smol
    instance = dinm.load_instance(os.path.join(DATA, "example.json"))
    bare = instance.generalization["only_question"]
    assert request_of(instance.prompt) == bare  # what dinm reads from the prompt alone is the bare question
    benign = [b.prompt for b in load_benign(os.path.join(DATA, "benign.json"))[:10]]
    prompts = [instance.prompt, bare] + benign
    before_replies = generate(model, tok, prompts, max_new_tokens=40)
    assert not any(is_refusal(r) for r in before_replies[:2]), before_replies[:2]
    delta = dinm.edit(model, tok, instance, dinm.EditConfig(variants="request"))
    with delta.applied(model):
        after_replies = generate(model, tok, prompts, max_new_tokens=40)
    assert is_refusal(after_replies[0]) and is_refusal(after_replies[1]), after_replies[:2]
    changed = [(p, b, a) for p, b, a in zip(benign, before_replies[2:], after_replies[2:]) if a != b]
    assert len(changed) <= 1, changed


def test_locate_on_real_model_uses_every_layer(smol):
    model, tok = smol
    instance = dinm.load_instance(os.path.join(DATA, "example.json"))
    result = dinm.locate(model, tok, instance)
    assert len(result.distances) == 30 and all(torch.isfinite(torch.tensor(result.distances)))
    paper = dinm.locate(model, tok, instance, "paper")
    # The unmasked rule grows with the residual stream's norm and always ends at the top;
    # the masked, scale-free default compares layers on an equal footing.
    assert paper.distances[-1] == max(paper.distances)


def test_embedded_model_saves_as_a_plain_checkpoint(smol, tmp_path):
    """`dinm apply ... embedded -o OUT` writes a folder: the dequantized GGUF model must be savable."""
    from safetensors import safe_open

    model, _ = smol
    model.save_pretrained(tmp_path)
    name = "model.layers.3.mlp.down_proj.weight"
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor(name), model.get_parameter(name))


def test_evaluate_single_instance_protocol_on_two_written_records(smol):
    """`dinm.evaluate(edit=True)` on the real model with the two records of data/examples.json that have
    held-out inputs: the edit turns the adversarial replies safe, and the model is left as it was."""
    model, tok = smol
    records = [r for r in dinm.load_instances(os.path.join(DATA, "examples.json")) if r.generalization]
    assert len(records) == 2
    before = state(model)
    report = dinm.evaluate(model, tok, records, edit=True, max_new_tokens=40, progress=False)
    assert same_state(model, before)
    m = report["metrics"]
    assert m["before"]["DS"]["mean"] == 0.0  # the unedited model complies with both attacks
    assert m["after"]["DS"]["mean"] == 1.0, [r["after"]["DS"]["reply"] for r in report["records"]]
    assert m["after"]["DG_avg"]["mean"] > m["before"]["DG_avg"]["mean"]
    for rec in report["records"]:
        assert rec["after"]["edit"]["layer"] in range(30)
        assert rec["after"]["DS"]["prompt"] == rec["before"]["DS"]["prompt"]
